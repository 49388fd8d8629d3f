"""Command-line options shared by ``acquire``, ``run`` and ``start``: which locks, and how; and
how every command shows text to a person (:func:`printable`, :func:`print_table`).

``--lock NAME`` (or a positional NAME for ``acquire``) takes a lock exclusively, ``--shared NAME``
shares it with other shared holders, ``--limit NAME=N`` shares it with at most N holders at once.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasklocks import names
from tasklocks.errors import EXIT_USAGE, TasklocksError, quote

__all__ = [
    "LockSpec",
    "OptionError",
    "add_mode_options",
    "limit_spec",
    "lock_spec",
    "print_table",
    "printable",
    "utf8_text",
]

# C0 controls, DEL, C1 controls, and lone surrogates (bytes that were not UTF-8).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` as a person's terminal may show it: a control character as ``\\x1b`` (C0, DEL
    and C1: a note or a task's message cannot move the cursor, retitle the window or recolour
    the screen) and a lone surrogate as ``\\udcff``. Human output only: ``--json`` is exact."""
    return _UNPRINTABLE.sub(_escape, text)


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Print ``rows`` (the header first) in aligned columns, every cell :func:`printable`: the
    one place the command line's tables (``locks``, ``waiting``, ``tasks``) are drawn."""
    cells = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


class OptionError(TasklocksError):
    """Lock options that contradict each other (exit 2)."""

    exit_code = EXIT_USAGE


def utf8_text(text: str) -> str:
    """argparse type for free text (``--note``, ``--kind``, a progress message): text UTF-8 can
    encode, as the database and every reader need (bytes that are not UTF-8 reach Python as lone
    surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"not UTF-8 text: {quote(text)}; give it in UTF-8"
        ) from None
    return text


def limit_spec(text: str) -> tuple[str, int]:
    """argparse type for ``--limit NAME=N``."""
    name, sep, count = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=N, e.g. app_tasks=3, not {quote(text)}")
    try:
        n = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"the limit in {quote(text)} is not a whole number"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the limit in {quote(text)} must be at least 1")
    return name, n


def add_mode_options(p: argparse.ArgumentParser) -> None:
    """``--shared NAME`` and ``--limit NAME=N`` (repeatable)."""
    p.add_argument(
        "--shared",
        action="append",
        default=[],
        metavar="NAME",
        help="a lock to share with other --shared holders (repeat for several)",
    )
    p.add_argument(
        "--limit",
        dest="limits",
        action="append",
        default=[],
        type=limit_spec,
        metavar="NAME=N",
        help="a lock at most N holders may share at once, e.g. app_tasks=3 (repeat)",
    )


@dataclass(frozen=True)
class LockSpec:
    """The locks a command asked for: every name, the shared ones and the counted ones."""

    names: list[str]
    shared: list[str]
    limits: dict[str, int]

    def kwargs(self) -> dict[str, Any]:
        """``shared=`` and ``limit=`` for :meth:`LockTable.acquire`."""
        return {"shared": self.shared, "limit": self.limits}


def lock_spec(exclusive: list[str], shared: list[str], limits: list[tuple[str, int]]) -> LockSpec:
    """Every lock named by the options, validated; a name both --shared and --limit is counted.
    :raises BadLockName: a name is not allowed. :raises OptionError: one name, two limits, or
        one name taken both exclusively and --shared or --limit."""
    counted: dict[str, int] = {}
    for name, n in limits:
        names.validate_name(name)
        if counted.setdefault(name, n) != n:
            raise OptionError(
                f"--limit gives {name} two limits ({counted[name]} and {n}); give one"
            )
    for name in [*exclusive, *shared]:
        names.validate_name(name)
    for name in exclusive:
        if name in counted or name in shared:
            option = "--limit" if name in counted else "--shared"
            raise OptionError(
                f"{name} is asked for both exclusively and with {option}; give one of the two"
            )
    all_names = list(dict.fromkeys([*exclusive, *shared, *counted]))
    return LockSpec(all_names, [n for n in dict.fromkeys(shared) if n not in counted], counted)
