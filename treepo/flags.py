"""Command-line flags from a dataclass config: one flag per field, its help text read from the
field's comment in the source, so the comment in the dataclass is the only place a knob is
documented (`treepo train --help` prints it, with the default and the valid values).

Why comments and not `field(metadata={"help": ...})`: the config stays one readable line per
field (`segment_len: int = 32  # l`), as in the paper's notation; the help is the comment text.
The convention the parser relies on: a field's doc is its trailing comment plus the comment-only
lines directly below it; a section heading (`# sampling`) follows a blank line.

Every flag takes both spellings (`--segment_len` and `--segment-len`); a boolean takes
`--resume`, `--resume true|false` (strict, see parse_bool) and `--no-resume`.
"""
from __future__ import annotations

import argparse
import ast
import functools
import inspect
import io
import json
import textwrap
import tokenize

METAVARS = {int: "INT", float: "FLOAT", str: "STR"}  # a flag's value in --help, by its type
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_bool(s: str) -> bool:
    """Strict: true/false, 1/0, yes/no (any case); anything else is an error naming the choices."""
    v = BOOL_WORDS.get(str(s).strip().lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"{s!r} is not a boolean; use one of {', '.join(BOOL_WORDS)}")
    return v


def spellings(name: str, prefix: str = "--") -> list[str]:
    """The option strings of field `name`: `--segment_len` and `--segment-len` (one for `--seed`)."""
    return list(dict.fromkeys([prefix + name, prefix + name.replace("_", "-")]))


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field name: its comment} for the annotated fields of class `cls`, read from its source.

    A field's doc is the comment on its line(s) plus the comment-only lines directly below it (up to
    a blank line or the next statement), joined with spaces; a field without a comment maps to "".
    Without the source (a bytecode-only install) every doc is "": flags still parse, --help is terse.
    """
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    docs = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        n = node.end_lineno + 1
        while n <= len(lines) and lines[n - 1].lstrip().startswith("#"):  # continuation lines
            parts.append(comments[n])
            n += 1
        docs[node.target.id] = " ".join(p for p in parts if p)
    return docs


def show(value) -> str:
    """A default as a user would type it: true/false, null, JSON for containers, else str()."""
    if isinstance(value, (bool, type(None), dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def help_text(doc: str, default, choices=None, extra: str = "") -> str:
    """`doc (default: X; valid: a, b; extra)`, % escaped for argparse."""
    notes = [f"default: {show(default)}"]
    if choices:
        notes.append(f"valid: {', '.join(map(str, choices))}")
    if extra:
        notes.append(extra)
    text = f"{doc} ({'; '.join(notes)})" if doc else f"({'; '.join(notes)})"
    return text.replace("%", "%%")


def add_bool_flag(ap: argparse.ArgumentParser, name: str, help: str):
    """`--name` (true), `--name true|false` (strict) and `--no-name` (false), both spellings each;
    the parsed value is None when none is given, so a config file or preset value can stand."""
    ap.add_argument(*spellings(name), dest=name, nargs="?", const=True, type=parse_bool, default=None,
                    metavar="BOOL", help=help)
    ap.add_argument(*spellings(name, "--no-"), *spellings(name, "--no_"), dest=name, action="store_const",
                    const=False, default=None, help=argparse.SUPPRESS)
