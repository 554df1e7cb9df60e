"""Check that the documentation quotes the API as the code defines it.

Run ``python scripts/check_docs.py``; it exits non-zero and lists every mismatch.

**Signatures in docs/api.md.** Every fenced block opened with ```` ```python ```` in
``docs/api.md`` holds API lines only. A line that starts (at column 0) with ``sct.`` or
``sctranscoder.`` is one of

- ``NAME(PARAMS)``: a signature. ``PARAMS`` is written as in a ``def`` (``*``, ``**kwargs``,
  defaults as Python literals) and may continue on indented lines until the parentheses close.
  It must list the real parameters (``inspect.signature``, without ``self`` and without private
  ``_names``) in order, with the same kind (positional or keyword-only, ``**``) and default;
- ``NAME = LITERAL``: a constant, whose value must be ``LITERAL``;
- ``NAME``: a name that must exist.

A trailing ``# comment``, blank lines and comment lines are allowed; any other line is an error,
so nothing in those blocks goes unchecked. Every name in ``__all__`` of ``sctranscoder`` and of
its subpackages ``pp``, ``tl``, ``get``, ``pl`` and ``datasets`` must have an API line.

**Mentions everywhere.** In README.md and docs/*.md, every dotted name ``sct.x.y`` or
``sctranscoder.x.y`` inside a code span or a fenced block must exist, and every call of one
(``sct.tl.trace_circuit(adata, cell="...")``) must bind to its signature: no unknown keyword, not
too many positional arguments. Keywords passed through ``**overrides`` of
``sct.tl.train_transcoders`` must be fields of ``TrainingConfig``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
MENTION_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBPACKAGES = ("pp", "tl", "get", "pl", "datasets")

FENCE = re.compile(r"^```(\S*)\s*$")
NAME = re.compile(r"(?:sct|sctranscoder)(?:\.[A-Za-z_]\w*)+")
#: A dotted name; one followed by ``/`` is a format string (``"sctranscoder.transcoders/2"``).
MENTION = re.compile(r"(?<![\w.])(?:sct|sctranscoder)(?:\.[A-Za-z_]\w*)+(?![\w/])")
#: File names that look like dotted names.
NOT_NAMES = {"sctranscoder.json"}
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
MISSING = object()


def resolve(dotted: str):
    """The object a dotted name ``sct.x.y`` / ``sctranscoder.x.y`` refers to, or MISSING."""
    parts = dotted.split(".")
    obj = importlib.import_module("sctranscoder")
    for part in parts[1:]:
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if inspect.ismodule(obj):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
                continue
            except ImportError:
                pass
        return MISSING
    return obj


def fenced_blocks(text: str):
    """``(language, first line number, lines)`` of every fenced block."""
    lang, start, lines = None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line.strip())
        if lang is None and match:
            lang, start, lines = match.group(1), number + 1, []
        elif lang is not None and line.strip() == "```":
            yield lang, start, lines
            lang = None
        elif lang is not None:
            lines.append(line)


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (outside string literals)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i].rstrip()
    return line.rstrip()


def api_lines(lines: list[str], first: int, problems: list[str]):
    """``(line number, statement)`` of the API lines of one block, continuations joined."""
    i = 0
    while i < len(lines):
        raw = strip_comment(lines[i])
        number = first + i
        i += 1
        if not raw.strip():
            continue
        if not NAME.match(raw):
            problems.append(f"docs/api.md:{number}: not an API line: {raw.strip()!r}")
            continue
        statement = raw
        while statement.count("(") > statement.count(")") and i < len(lines):
            statement += " " + strip_comment(lines[i]).strip()
            i += 1
        yield number, statement


def real_parameters(obj, owner_is_class: bool) -> list[inspect.Parameter]:
    params = list(inspect.signature(obj).parameters.values())
    if owner_is_class and params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [p for p in params if not p.name.startswith("_")]


def factory_defaults(obj) -> dict[str, object]:
    """Values of a dataclass's ``default_factory`` fields (shown as ``<factory>`` otherwise)."""
    if not (inspect.isclass(obj) and dataclasses.is_dataclass(obj)):
        return {}
    return {
        f.name: f.default_factory()
        for f in dataclasses.fields(obj)
        if f.default_factory is not dataclasses.MISSING
    }


def same_value(a, b) -> bool:
    return type(a) is type(b) and a == b


def doc_parameters(params_text: str) -> list[tuple[str, inspect._ParameterKind, object]]:
    """``(name, kind, default or MISSING)`` of a documented parameter list."""
    tree = ast.parse(f"def _f({params_text}): pass").body[0].args
    out = []
    positional = tree.posonlyargs + tree.args
    first_default = len(positional) - len(tree.defaults)
    for j, arg in enumerate(positional):
        default = (
            ast.literal_eval(tree.defaults[j - first_default]) if j >= first_default else MISSING
        )
        out.append((arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default))
    if tree.vararg is not None:
        out.append((tree.vararg.arg, inspect.Parameter.VAR_POSITIONAL, MISSING))
    for arg, default in zip(tree.kwonlyargs, tree.kw_defaults, strict=True):
        value = MISSING if default is None else ast.literal_eval(default)
        out.append((arg.arg, inspect.Parameter.KEYWORD_ONLY, value))
    if tree.kwarg is not None:
        out.append((tree.kwarg.arg, inspect.Parameter.VAR_KEYWORD, MISSING))
    return out


def check_signature(where: str, name: str, params_text: str, problems: list[str]) -> None:
    obj = resolve(name)
    if obj is MISSING:
        problems.append(f"{where}: {name} does not exist")
        return
    owner = resolve(name.rsplit(".", 1)[0])
    try:
        documented = doc_parameters(params_text)
    except (SyntaxError, ValueError) as err:
        problems.append(f"{where}: {name}: cannot parse the parameters ({err})")
        return
    real = real_parameters(obj, inspect.isclass(owner) and not inspect.isclass(obj))
    factories = factory_defaults(obj)
    doc_names = [n for n, _, _ in documented]
    real_names = [p.name for p in real]
    if doc_names != real_names:
        problems.append(
            f"{where}: {name}: parameters {doc_names} documented, the code has {real_names}"
        )
        return
    positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for (pname, kind, default), p in zip(documented, real, strict=True):
        real_kind = (
            inspect.Parameter.POSITIONAL_OR_KEYWORD if p.kind in positional_kinds else p.kind
        )
        if kind != real_kind:
            problems.append(
                f"{where}: {name}({pname}): documented as {kind.description}, "
                f"the code has {p.kind.description}"
            )
        real_default = factories.get(pname, p.default)
        if real_default is inspect.Parameter.empty:
            real_default = MISSING
        if default is MISSING and real_default is MISSING:
            continue
        if default is MISSING or real_default is MISSING or not same_value(default, real_default):
            shown = "none" if default is MISSING else repr(default)
            actual = "none" if real_default is MISSING else repr(real_default)
            problems.append(
                f"{where}: {name}({pname}): default {shown} documented, the code has {actual}"
            )


def check_api(problems: list[str]) -> set[str]:
    """Check docs/api.md's python blocks; return the names they quote."""
    quoted: set[str] = set()
    for lang, first, lines in fenced_blocks(API.read_text()):
        if lang != "python":
            continue
        for number, statement in api_lines(lines, first, problems):
            where = f"docs/api.md:{number}"
            name = NAME.match(statement).group(0)
            rest = statement[len(name) :].strip()
            quoted.add(name)
            if rest.startswith("(") and rest.endswith(")"):
                check_signature(where, name, rest[1:-1], problems)
            elif rest.startswith("="):
                obj = resolve(name)
                try:
                    value = ast.literal_eval(rest[1:].strip())
                except (SyntaxError, ValueError):
                    problems.append(f"{where}: {name}: the value is not a literal: {rest!r}")
                    continue
                if obj is MISSING:
                    problems.append(f"{where}: {name} does not exist")
                elif not same_value(obj, value):
                    problems.append(f"{where}: {name} is {obj!r} in the code, not {value!r}")
            elif not rest:
                if resolve(name) is MISSING:
                    problems.append(f"{where}: {name} does not exist")
            else:
                problems.append(f"{where}: cannot read the API line {statement!r}")
    return quoted


def check_complete(quoted: set[str], problems: list[str]) -> None:
    import sctranscoder as sct

    public = [f"sct.{n}" for n in sct.__all__ if n not in SUBPACKAGES]
    for sub in SUBPACKAGES:
        public += [f"sct.{sub}.{n}" for n in getattr(sct, sub).__all__]
    for name in public:
        if name not in quoted:
            problems.append(f"docs/api.md: no API line for {name}")


def training_fields() -> set[str]:
    from sctranscoder import TrainingConfig

    return {f.name for f in dataclasses.fields(TrainingConfig)}


def dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in ("sct", "sctranscoder"):
        return ".".join([node.id, *reversed(parts)])
    return None


def check_calls(where: str, code: str, problems: list[str]) -> None:
    """Every ``sct.*`` call in ``code`` binds to its signature (when ``code`` parses)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name is None:
            continue
        obj = resolve(name)
        if obj is MISSING or not callable(obj):
            continue  # reported by the name check
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        ):
            continue
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        keywords = {k.arg: None for k in node.keywords}
        try:
            bound = sig.bind_partial(*([None] * len(node.args)), **keywords)
        except TypeError as err:
            problems.append(f"{where}: {ast.unparse(node)[:80]}: {err}")
            continue
        if name.endswith("tl.train_transcoders"):
            extra = set(bound.arguments.get("overrides", {})) - training_fields()
            if extra:
                problems.append(
                    f"{where}: {ast.unparse(node)[:80]}: {sorted(extra)} are not TrainingConfig "
                    "fields"
                )


def check_mentions(problems: list[str]) -> None:
    for path in MENTION_FILES:
        text = path.read_text()
        rel = path.relative_to(ROOT)
        fenced: set[int] = set()
        for _, first, lines in fenced_blocks(text):
            fenced.update(range(first, first + len(lines)))
            check_calls(f"{rel}:{first}", "\n".join(lines), problems)
            for offset, line in enumerate(lines):
                for name in MENTION.findall(line):
                    if name not in NOT_NAMES and resolve(name) is MISSING:
                        problems.append(f"{rel}:{first + offset}: {name} does not exist")
        for number, line in enumerate(text.splitlines(), 1):
            if number in fenced or line.strip().startswith("```"):
                continue
            for _, span in CODE_SPAN.findall(line):
                for name in MENTION.findall(span):
                    if name not in NOT_NAMES and resolve(name) is MISSING:
                        problems.append(f"{rel}:{number}: {name} does not exist")
                check_calls(f"{rel}:{number}", span, problems)


def main() -> int:
    problems: list[str] = []
    quoted = check_api(problems)
    check_complete(quoted, problems)
    check_mentions(problems)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} mismatch(es) between the documentation and the code.")
        return 1
    print(f"docs match the code: {len(quoted)} API lines in docs/api.md checked.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
