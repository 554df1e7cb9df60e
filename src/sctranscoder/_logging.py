"""Logging through scanpy's logger, so that ``sc.settings.verbosity`` controls every message.

Tools (``pp``/``tl``/``pl``/``get``) log with ``from scanpy import logging as logg``, as scanpy
does. The torch core logs with the standard library (``logging.getLogger(__name__)``, no scanpy
import there); :func:`bridge_core_logs` forwards those records to scanpy's logger at their level.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

#: The standard-library logger above every module of the package.
PACKAGE_LOGGER = "sctranscoder"


class _ToScanpy(logging.Handler):
    """Send a record to scanpy's logger, which filters it by ``sc.settings.verbosity``."""

    def emit(self, record: logging.LogRecord) -> None:
        from scanpy import logging as logg

        log = {
            logging.ERROR: logg.error,
            logging.WARNING: logg.warning,
            logging.INFO: logg.info,
        }.get(record.levelno, logg.debug)
        if record.levelno >= logging.CRITICAL:
            log = logg.error
        try:
            log(record.getMessage())
        except Exception:  # a logging failure must never break a computation
            self.handleError(record)


def bridge_core_logs() -> None:
    """Forward the package's standard-library log records to scanpy's logger (once).

    The package logger stops propagating to the root logger (scanpy shows the records; they
    would otherwise print twice, and at every level, where the root logger has a handler).
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(h, _ToScanpy) for h in logger.handlers):
        logger.addHandler(_ToScanpy())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.DEBUG)  # scanpy's verbosity decides what is shown
    logger.propagate = False


@contextmanager
def quiet_scanpy() -> Iterator[None]:
    """Hide scanpy's own info messages from a scanpy call made inside one of our tools (they
    name scratch objects of ours); warnings and errors still show.
    """
    from scanpy import settings
    from scanpy._settings import Verbosity

    level = min(settings.verbosity, Verbosity.warning)
    with settings.verbosity.override(level):
        yield


@contextmanager
def quiet_third_party_logs() -> Iterator[None]:
    """Mute standard-library log records below ERROR during a third-party call that prints its
    own (gseapy attaches a handler to a new logger on every call); restored after.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
