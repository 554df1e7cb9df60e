"""The ``sctranscoder`` command: the tools of the Python API on ``.h5ad`` files.

Each command reads an ``.h5ad``, calls one function of the API with the options given (options
are generated from the function, see :mod:`._options`), and writes the result atomically: to a
temporary sibling of the output, renamed into place once complete. Logs and progress bars go to
stderr, a one-line JSON summary of what was written to stdout. Exit codes: :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._options import Param, dataclass_params, function_params

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from anndata import AnnData

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID = 4
EXIT_OUTPUT = 5
EXIT_MEMORY = 6
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

#: Every exit code and what it means (shown by ``--help`` and in ``docs/cli.md``).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "unexpected error (rerun with --debug and report the traceback)",
    EXIT_USAGE: "bad usage: unknown option, bad option value, missing -o/--in-place",
    EXIT_NOT_FOUND: "an input file or directory does not exist or cannot be read",
    EXIT_INVALID: "invalid input: the data or an option was refused (the message says the fix)",
    EXIT_OUTPUT: "the output could not be written (nothing was replaced)",
    EXIT_MEMORY: "out of memory (CPU or GPU)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGINT)",
    EXIT_TERMINATED: "terminated (SIGTERM, e.g. a scheduler's time limit)",
}
#: Errors of our validation (wrong data, option values, keys, existing or missing paths).
_INVALID = (ValueError, KeyError, FileExistsError, NotADirectoryError, IsADirectoryError)
#: Handled by the command line itself, never options.
_FIXED = ("adata", "copy", "progress")


@dataclass(frozen=True)
class Command:
    """A subcommand: the API function it runs and how its inputs and outputs map to files."""

    name: str
    function: Callable
    #: ``"always"``: writes the AnnData (``-o``/``--in-place``); ``"never"``: only a directory;
    #: ``"link"``: only with ``--link``.
    h5ad: str = "always"
    #: The parameter that takes the input AnnData (first positional).
    input_param: str = "adata"
    #: The parameter given as a second positional argument (an output directory).
    directory: str | None = None
    #: How ``--help`` names that argument, and what it says of it.
    directory_metavar: str = "DIR"
    directory_help: str = "the directory to write"
    #: Parameters without a type in the signature: their command-line type.
    hints: dict = field(default_factory=dict)
    #: Also every field of :class:`~sctranscoder.core.training.TrainingConfig` (``**overrides``).
    training_config: bool = False
    #: The function works on a backed AnnData (``docs/storage.md``): offer ``--backed``.
    backed: bool = False

    @property
    def skip(self) -> tuple[str, ...]:
        extra = ("config",) if self.training_config else ()
        return (*_FIXED, self.input_param, *([self.directory] if self.directory else []), *extra)

    def params(self) -> list[Param]:
        params = function_params(self.function, skip=self.skip, hints=self.hints)
        if self.training_config:
            from ..core.training import TrainingConfig

            params += dataclass_params(TrainingConfig)
        return params


def commands() -> dict[str, Command]:
    """The subcommands (``"export <what>"`` for the exports)."""
    import sctranscoder as sct

    table = [
        Command("sentences", sct.pp.cell_sentences, backed=True),
        Command("train", sct.tl.train_transcoders, training_config=True, backed=True),
        Command("activations", sct.tl.feature_activations, backed=True),
        Command("trace", sct.tl.trace_circuit, hints={"gene_sets": "str | None"}),
        Command("annotate", sct.tl.annotate_features),
        Command(
            "explore",
            sct.pl.explorer,
            h5ad="never",
            directory="path",
            directory_metavar="OUTPUT.html",
            directory_help="the explorer to write: one self-contained .html file",
        ),
        Command("export transcoders", sct.save_transcoders, h5ad="link", directory="path"),
        Command(
            "export circuit-tracer-graph",
            sct.export_circuit_tracer_graph,
            h5ad="never",
            directory="path",
        ),
        Command(
            "export circuit-tracer-transcoders",
            sct.export_circuit_tracer_transcoders,
            h5ad="never",
            input_param="transcoders",
            directory="path",
        ),
    ]
    return {c.name: c for c in table}


# -- the parser -----------------------------------------------------------------------------------


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    return (
        "Options are those of the Python function, with its defaults; an option left out is not "
        "passed.\nLists are comma-separated ('' is empty); 'none' passes None where the function "
        "takes it.\nstdout: one line of JSON saying what was written; stderr: logs and progress."
        f"\n\nexit codes:\n{codes}"
    )


def _summary(fn: Callable) -> str:
    doc = (fn.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("logging")
    group.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    group.add_argument("-v", "--verbose", action="store_true", help="also debug messages")
    group.add_argument(
        "--debug", action="store_true", help="print the traceback of an error (for bug reports)"
    )
    return common


def _add_command(subparsers, name: str, command: Command, common: argparse.ArgumentParser):
    fn = command.function
    where = f"{fn.__module__.split('.')[0]}.{_public_name(fn)}"
    parser = subparsers.add_parser(
        name,
        parents=[common],
        help=_summary(fn),
        description=f"{_summary(fn)}\n\nRuns {where} (see its docstring).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    files = parser.add_argument_group("input and output")
    files.add_argument("input", metavar="INPUT.h5ad", help="the AnnData to read")
    if command.directory:
        files.add_argument(
            "directory", metavar=command.directory_metavar, help=command.directory_help
        )
    if command.h5ad != "never":
        out = files.add_mutually_exclusive_group(required=command.h5ad == "always")
        out.add_argument(
            "-o",
            "--output",
            metavar="OUTPUT.h5ad",
            help="write the result to this .h5ad (an existing file is replaced once complete)",
        )
        out.add_argument(
            "--in-place", action="store_true", help="replace INPUT.h5ad with the result"
        )
    if command.backed:
        files.add_argument(
            "--backed",
            action="store_true",
            help="open INPUT.h5ad backed: X and raw.X are read from disk as needed, never whole",
        )
    options = parser.add_argument_group(f"options of {where}")
    params = command.params()
    reserved = {"input", "directory", "output", "in_place", "backed", "quiet", "verbose", "debug"}
    reserved |= {"cli_command", "cli_params"}
    names = [p.name for p in params]
    clash = sorted((set(names) & reserved) | {n for n in names if names.count(n) > 1})
    if clash:  # a new API argument named like ours: rename one of them
        raise TypeError(f"{where}: option(s) {clash} clash with the command line's own.")
    config_group = None
    for p in params:
        target = options
        if command.training_config and p.name not in _parameter_names(fn):
            config_group = config_group or parser.add_argument_group(
                "training settings (fields of sctranscoder.TrainingConfig)"
            )
            target = config_group
        p.add_to(target)
    parser.set_defaults(cli_command=command, cli_params=[p.name for p in params])
    return parser


def _parameter_names(fn: Callable) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def _public_name(fn: Callable) -> str:
    """``pp.cell_sentences``, ``tl.train_transcoders``, or the top-level name."""
    parts = fn.__module__.split(".")
    sub = parts[1] if len(parts) > 1 and parts[1] in ("pp", "tl", "get", "pl") else None
    return f"{sub}.{fn.__name__}" if sub else fn.__name__


def build_parser() -> argparse.ArgumentParser:
    """The ``sctranscoder`` parser, with one subcommand per entry of :func:`commands`."""
    import sctranscoder

    parser = argparse.ArgumentParser(
        prog="sctranscoder",
        description="Transcoders and circuits of Cell2Sentence models on .h5ad files. Start "
        "from a raw .h5ad with `sentences`, then `train`, `activations`, `trace`, `annotate`, "
        "`explore` (an HTML explorer) and `export`. Under torchrun, `train` runs data-parallel.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=sctranscoder.__version__)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    common = _common_parser()
    table = commands()
    export = None
    for name, command in table.items():
        if name.startswith("export "):
            if export is None:
                export_parser = sub.add_parser(
                    "export",
                    help="write transcoders or a circuit to a directory (ours, circuit-tracer's)",
                    description="Write transcoders or a traced circuit to a directory.",
                    epilog=_epilog(),
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                )
                export = export_parser.add_subparsers(title="what", metavar="WHAT", required=True)
            _add_command(export, name.split(" ", 1)[1], command, common)
        else:
            _add_command(sub, name, command, common)
    return parser


# -- running --------------------------------------------------------------------------------------


class _Exit(Exception):
    """A failure with its exit code and the one line that says what to do."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that temporary files are removed."""


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]  # str(KeyError) quotes its message
    return str(exc) or type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError)


@contextlib.contextmanager
def _stage(code: int, what: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Turn ``errors`` raised inside into exit ``code`` (a missing file is always 3)."""
    try:
        yield
    except _Exit:
        raise
    except FileNotFoundError as exc:
        raise _Exit(EXIT_NOT_FOUND if code != EXIT_OUTPUT else code, _message(exc)) from exc
    except errors as exc:
        if _is_oom(exc):
            raise
        raise _Exit(code, f"{what}{_message(exc)}") from exc


def _check_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The input file (it must exist) and the output file (its folder must be writable)."""
    source = Path(args.input)
    if not source.is_file():
        what = "is a directory, not an .h5ad file" if source.is_dir() else "does not exist"
        raise _Exit(EXIT_NOT_FOUND, f"input {source} {what}.")
    if not os.access(source, os.R_OK):
        raise _Exit(EXIT_NOT_FOUND, f"input {source} cannot be read (permissions).")
    output = getattr(args, "output", None)
    target = source if getattr(args, "in_place", False) else Path(output) if output else None
    if output and target.suffix != ".h5ad":
        raise _Exit(EXIT_USAGE, f"-o {target}: the output is an .h5ad file; name it *.h5ad.")
    if target is not None:
        if target.is_dir():
            raise _Exit(EXIT_USAGE, f"-o {target} is a directory: name the .h5ad file to write.")
        folder = target.parent
        while not folder.exists():  # atomic_file creates the missing folders
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise _Exit(EXIT_OUTPUT, f"cannot write {target}: {folder} is not writable.")
    return source, target


def _check_usage(command: Command, args: argparse.Namespace) -> None:
    has_output = bool(getattr(args, "output", None) or getattr(args, "in_place", False))
    if command.h5ad == "link" and getattr(args, "link", False) and not has_output:
        raise _Exit(EXIT_USAGE, "--link changes the AnnData: pass -o OUTPUT.h5ad or --in-place.")
    if command.h5ad == "link" and has_output and not getattr(args, "link", False):
        raise _Exit(EXIT_USAGE, "-o/--in-place go with --link only: without it nothing changes.")
    if _launched_by_torchrun() and command.name != "train":
        raise _Exit(
            EXIT_USAGE,
            f"only `train` runs data-parallel; run `sctranscoder {command.name}` as one process, "
            "without torchrun.",
        )


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """A ``torch.distributed`` process group under torchrun (nccl with CUDA, else gloo)."""
    import torch
    import torch.distributed as dist

    if not _launched_by_torchrun() or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _kwargs(command: Command, args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {name: getattr(args, name) for name in args.cli_params if hasattr(args, name)}
    from ..datasets import TINY_C2S_NAME, tiny_c2s

    if kwargs.get("model") == TINY_C2S_NAME:  # the embedded model by its recorded name
        kwargs["model"] = tiny_c2s()
    return kwargs


def _snapshot(adata: AnnData) -> dict[str, dict[str, int]]:
    return {
        "uns": {k: id(v) for k, v in adata.uns.items()},
        "obs": dict.fromkeys(adata.obs.columns, 0),
        "obsm": dict.fromkeys(adata.obsm, 0),
    }


def _written(before: dict, adata: AnnData) -> dict[str, list[str]]:
    """Keys added (and ``uns`` records replaced) by the command."""
    after = _snapshot(adata)
    return {
        where: [k for k, v in after[where].items() if before[where].get(k, -1) != v]
        for where in after
    }


def _run(command: Command, args: argparse.Namespace) -> dict[str, Any]:
    import anndata as ad
    from scanpy import logging as logg

    from ..core import distributed as dist
    from ..core.files import atomic_file

    _check_usage(command, args)
    source, target = _check_paths(args)
    with _stage(EXIT_NOT_FOUND, f"cannot read {source}: ", (Exception,)):
        adata = ad.read_h5ad(source, backed="r" if getattr(args, "backed", False) else None)
    kwargs = _kwargs(command, args)
    if "progress" in _parameter_names(command.function):
        kwargs["progress"] = not args.quiet and dist.rank() == 0
    positional = [adata] + ([args.directory] if command.directory else [])
    before = _snapshot(adata)
    start = time.perf_counter()
    with _stage(EXIT_INVALID, "", _INVALID):
        result = command.function(*positional, **kwargs)
    summary: dict[str, Any] = {"command": command.name, "input": str(source)}
    if isinstance(result, os.PathLike):
        summary["path"] = os.fspath(result)
    if target is not None and dist.rank() == 0:  # every rank holds the same results
        with _stage(EXIT_OUTPUT, f"cannot write {target}: ", (Exception,)):
            start_write = logg.info(f"writing {target}")
            with atomic_file(target) as tmp:
                adata.write_h5ad(tmp)
                if adata.isbacked:  # now backed by tmp: close it before it is renamed
                    adata.file.close()
            logg.info("    finished", time=start_write)
        summary["output"] = str(target)
        summary["written"] = _written(before, adata)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sctranscoder`` command line; returns the exit code (see :data:`EXIT_CODES`)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2, printed by argparse)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: Command = args.cli_command
    prog = f"sctranscoder {command.name}"

    def terminate(signum, frame):
        raise _Terminated()

    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may set it
        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        import scanpy as sc

        from ..core import distributed as dist

        with _process_group() if command.name == "train" else contextlib.nullcontext():
            level = "warning" if args.quiet or dist.rank() > 0 else "info"
            with (
                sc.settings.verbosity.override("debug" if args.verbose else level),
                _logs_to_stderr(),
            ):
                summary = _run(command, args)
            if dist.rank() == 0:
                print(json.dumps(summary), file=sys.stdout, flush=True)
        return EXIT_OK
    except _Exit as exc:
        return _fail(prog, exc.code, _with_flags(str(exc), args.cli_params), args.debug)
    except _Terminated:
        return _fail(prog, EXIT_TERMINATED, "terminated (SIGTERM); no output written", args.debug)
    except KeyboardInterrupt:
        return _fail(prog, EXIT_INTERRUPTED, "interrupted; no output written", args.debug)
    except Exception as exc:
        if _is_oom(exc):
            message = f"out of memory: {_message(exc)} (try a smaller batch_size)"
            return _fail(prog, EXIT_MEMORY, message, args.debug)
        message = f"{type(exc).__name__}: {_message(exc)} (rerun with --debug for the traceback)"
        return _fail(prog, EXIT_ERROR, message, args.debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _logs_to_stderr() -> Iterator[None]:
    """Scanpy's log messages to the current ``sys.stderr`` (scanpy keeps the one it was imported
    with), and back.
    """
    from scanpy import settings

    previous = settings.logfile
    settings.logfile = sys.stderr
    try:
        yield
    finally:
        settings.logfile = previous


def _with_flags(message: str, params: list[str]) -> str:
    """``message`` (the API's, naming Python arguments) with the options those arguments are."""
    named = [p for p in params if re.search(rf"\b{p}=", message)]
    if not named:
        return message
    return f"{message} [options: {', '.join('--' + p.replace('_', '-') for p in named)}]"


def _fail(prog: str, code: int, message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc(file=sys.stderr)
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code
