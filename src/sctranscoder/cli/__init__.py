"""The ``sctranscoder`` command line (``docs/cli.md``): ``sentences``, ``train``,
``activations``, ``trace``, ``annotate`` and ``export`` on ``.h5ad`` files, with the options and
defaults of the Python API, generated from it.
"""

from ._main import EXIT_CODES, build_parser, commands, main

__all__ = ["EXIT_CODES", "build_parser", "commands", "main"]
