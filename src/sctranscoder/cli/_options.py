"""Command-line options generated from the Python API: a function's signature and the
"Parameters" of its numpy docstring, or a dataclass's fields and its "Attributes". Names, types,
defaults and help are written once, in the API; nothing here repeats them.

Forms (see ``docs/cli.md``): ``bool`` -> ``--flag/--no-flag``; ``int``, ``float``, ``str`` (and
unions holding ``str``, such as paths) -> one value; ``Literal[...]`` -> a choice;
``Sequence[int]``/``Sequence[str]`` -> comma-separated values (``''``: empty). Where ``None`` is
a valid value, the word ``none`` passes it. An option left out is not passed at all, so the
function's own default applies.
"""

from __future__ import annotations

import argparse
import builtins
import collections.abc
import dataclasses
import inspect
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

#: The word that passes ``None`` to an option whose type admits it.
NONE = "none"
_SEQUENCES = (collections.abc.Sequence, list, tuple)
_SCALARS = {int: "INT", float: "FLOAT", str: "STR"}


class _OpaqueMeta(type):
    def __getattr__(cls, name: str) -> type:
        return cls

    def __getitem__(cls, item: object) -> type:
        return cls


class _Opaque(metaclass=_OpaqueMeta):
    """Stands for a name imported only for type checking (``AnnData``, ``C2SModel``, ...)."""


class _Names(dict):
    """Names an annotation string may use: the module's, then builtins, else :class:`_Opaque`."""

    def __missing__(self, name: str) -> object:
        return getattr(builtins, name, _Opaque)


def resolve_annotation(annotation: object, module: str) -> object:
    """The annotation object of ``annotation`` (a string under ``from __future__ import
    annotations``), evaluated in ``module``'s namespace with ``typing``-only names opaque.
    """
    if not isinstance(annotation, str):
        return annotation
    names = _Names(vars(sys.modules[module]))
    names.setdefault("os", os)
    for name in ("Sequence", "Mapping", "Iterable"):
        names.setdefault(name, getattr(collections.abc, name))
    for name in ("Literal", "Any"):
        names.setdefault(name, getattr(typing, name))
    return eval(annotation, {"__builtins__": builtins}, names)


@dataclass(frozen=True)
class Form:
    """How one parameter is written on the command line."""

    kind: str  # "bool", "scalar", "list" or "choice"
    item: type = str  # the type of one value
    choices: tuple = ()
    optional: bool = False  # None is a valid value

    @classmethod
    def of(cls, hint: object) -> Form | None:
        """The form of a type hint; ``None`` when it has none (an object, a callable)."""
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            members = typing.get_args(hint)
        else:
            members = (hint,)
        optional = type(None) in members
        rest = [m for m in members if m is not type(None)]
        if rest == [bool]:
            return cls("bool", bool, optional=optional)
        if len(rest) == 1 and typing.get_origin(rest[0]) is typing.Literal:
            choices = typing.get_args(rest[0])
            return cls("choice", type(choices[0]), choices, optional)
        if len(rest) == 1 and rest[0] in _SCALARS:
            return cls("scalar", rest[0], optional=optional)
        for m in rest:
            args = typing.get_args(m)
            if typing.get_origin(m) in _SEQUENCES and args and args[0] in (int, str):
                return cls("list", args[0], optional=optional)
        if str in rest or os.PathLike in rest:  # a name or a path, among other objects
            return cls("scalar", str, optional=optional)
        return None

    def metavar(self, name: str) -> str:
        """What ``--help`` shows as the value."""
        if self.kind == "choice":
            return "{" + ",".join(map(str, (*self.choices, *[NONE] * self.optional))) + "}"
        word = _SCALARS.get(self.item, "STR")
        if name.endswith(("_dir", "path")):
            word = "DIR" if name.endswith("_dir") else "PATH"
        return f"{word}[,{word}...]" if self.kind == "list" else word

    def parse(self, text: str) -> Any:
        """The value of ``text`` (``argparse`` reports a ``ValueError`` as a bad value)."""
        if self.optional and text.strip().lower() == NONE:
            return None
        if self.kind == "list":
            return [_convert(self.item, t.strip()) for t in text.split(",") if t.strip()]
        value = _convert(self.item, text)
        if self.kind == "choice" and value not in self.choices:
            raise ValueError(text)
        return value


def _convert(item: type, text: str) -> Any:
    if item is int:
        try:
            return int(text)
        except ValueError:  # 2e6 and 1_000_000 for counts of tokens
            value = float(text)
            if not value.is_integer():
                raise
            return int(value)
    return item(text)


def _parser_type(form: Form, name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return form.parse(text)

    # argparse names the type in "invalid <name> value" errors
    parse.__name__ = form.metavar(name).lower() if form.kind == "choice" else form.item.__name__
    return parse


def docstring_entries(obj: object, section: str = "Parameters") -> dict[str, str]:
    """The entries of a numpy docstring section, by name, as one line of plain text each.

    ``a, b`` entries give both names the same text; ``*args``/``**kwargs`` entries are left out.
    """
    lines = (inspect.getdoc(obj) or "").splitlines()
    out: dict[str, str] = {}
    inside, names, text = False, [], []

    def flush() -> None:
        for n in names:
            out[n] = clean(" ".join(text))

    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if re.fullmatch(r"-{3,}", nxt.strip()) and line.strip():  # a section header
            if inside:
                break
            inside = line.strip() == section
            continue
        if not inside or re.fullmatch(r"-{3,}", line.strip()):
            continue
        if line and not line[0].isspace():
            flush()
            head = line.split(" : ")[0]
            names = [n.strip() for n in head.split(",") if not n.strip().startswith("*")]
            text = []
        elif line.strip():
            text.append(line.strip())
    if inside:
        flush()
    return out


def clean(text: str) -> str:
    """ReST of a docstring as plain text for ``--help`` (roles and double backquotes dropped)."""
    text = re.sub(r":[a-z:]+:`~?([^`<]*?)\s*<[^`]*>`", r"\1", text)  # :role:`text <target>`
    text = re.sub(r":[a-z:]+:`~([^`]*)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r":[a-z:]+:`([^`]*)`", r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    return text


def show_default(value: object, form: Form, flag: str) -> str | None:
    """A default as the command line writes it; ``None`` for ``None`` (the help explains it)."""
    if value is None or value is inspect.Parameter.empty:
        return None
    if form.kind == "bool":
        return flag if value else "--no-" + flag[2:]
    if form.kind == "list":
        return ",".join(map(str, value)) or "''"
    return str(value)


@dataclass(frozen=True)
class Param:
    """One generated option: the Python name, its form, default and help."""

    name: str
    form: Form
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_to(self, group: argparse._ActionsContainer) -> None:
        """Add the option; left out, it is not passed (``argparse.SUPPRESS``)."""
        required = self.default is inspect.Parameter.empty
        shown = show_default(self.default, self.form, self.flag)
        text = self.help + (f" (default: {shown})" if shown is not None else "")
        text = text.replace("%", "%%")
        if self.form.kind == "bool":
            group.add_argument(
                self.flag,
                dest=self.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                required=required,
                help=text,
            )
            return
        group.add_argument(
            self.flag,
            dest=self.name,
            type=_parser_type(self.form, self.name),
            default=argparse.SUPPRESS,
            required=required,
            metavar=self.form.metavar(self.name),
            help=text + (" (required)" if required else ""),
        )


def function_params(
    fn: Callable, *, skip: Iterable[str] = (), hints: dict[str, object] | None = None
) -> list[Param]:
    """Options for the parameters of ``fn`` except ``skip``, ``*args`` and ``**kwargs``.

    ``hints`` gives the type of a parameter that has none in the signature. A parameter without
    a command-line form is refused (``TypeError`` naming it), so that a new argument of the API
    is either given a form or skipped on purpose, never silently dropped.
    """
    docs = docstring_entries(fn)
    skip = set(skip)
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = (hints or {}).get(p.name, p.annotation)
        form = Form.of(resolve_annotation(hint, fn.__module__))
        if form is None:
            raise TypeError(
                f"{fn.__module__}.{fn.__qualname__}: parameter {p.name!r} ({p.annotation}) has "
                "no command-line form; skip it or give it a type in sctranscoder/cli/_main.py."
            )
        out.append(Param(p.name, form, p.default, docs.get(p.name, "")))
    return out


def dataclass_params(cls: type) -> list[Param]:
    """Options for every field of the dataclass ``cls`` (help from its "Attributes")."""
    docs = docstring_entries(cls, "Attributes")
    out = []
    for f in dataclasses.fields(cls):
        form = Form.of(resolve_annotation(f.type, cls.__module__))
        if form is None:
            raise TypeError(f"{cls.__qualname__}.{f.name} ({f.type}) has no command-line form.")
        default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
        out.append(Param(f.name, form, default, docs.get(f.name, "")))
    return out
