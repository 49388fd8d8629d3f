"""Lock-name validation and helpers for the usual name families."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from tasklocks.errors import BadLockName, quote

__all__ = [
    "ALLOWED",
    "app_task",
    "full_backup",
    "mail_restart",
    "platform_update",
    "validate_name",
    "validate_namespace",
    "validate_note",
    "validate_owner",
    "validate_seconds",
]

ALLOWED = "1-200 characters of letters, digits and ._:/@-"
_NAME = re.compile(r"[A-Za-z0-9._:/@-]{1,200}")
_FULLMATCH = _NAME.fullmatch


def _check(kind: str, value: object) -> str:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise BadLockName(f"bad {kind} {quote(value)}: use {ALLOWED}")
    return value


def is_name(value: str) -> bool:
    """Is ``value`` a valid lock name (letters, digits and ``._:/@-``, 1 to 200 of them)?"""
    return _FULLMATCH(value) is not None


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid lock name, else raise :class:`BadLockName`."""
    if type(name) is str and _FULLMATCH(name) is not None:  # the common call, without _check's
        return name
    return _check("lock name", name)


def validate_namespace(namespace: object) -> str:
    """Return ``namespace`` if valid (the lock-name alphabet), else raise :class:`BadLockName`."""
    return _check("namespace", namespace)


def validate_owner(owner: object) -> str:
    """Return ``owner`` if valid (same alphabet as lock names), else raise :class:`BadLockName`."""
    if type(owner) is str and _FULLMATCH(owner) is not None:
        return owner
    return _check("owner", owner)


def validate_note(note: object, what: str = "a note") -> str | None:
    """``note`` if it is free text (or None) that every store keeps: every reader of the
    document (or of a task's record, for ``what``) decodes it, and PostgreSQL's text refuses NUL
    (a note reaches a text column as part of a waiting task's message).

    :raises TypeError: not a str. :raises ValueError: UTF-8 cannot encode it (a lone
        surrogate), or it holds a NUL character."""
    if note is None:
        return None
    if not isinstance(note, str):
        raise TypeError(f"{what} is text (a str) or None, not {type(note).__name__}")
    try:
        note.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} must be text UTF-8 can encode: {exc.reason}") from None
    if "\x00" in note:
        raise ValueError(
            f"{what} holds a NUL character (\\x00), which PostgreSQL cannot store; leave it out"
        )
    return note


def storable_text(text: str) -> str:
    """``text`` as every store keeps it: a lone surrogate (bytes that were not UTF-8) as a
    backslash escape (``\\udcff``) and NUL as ``\\x00``. For text written from what nobody
    checked first: a command's arguments as a lock note, an exception's message."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validate_seconds(what: str, value: object) -> float | None:
    """``value`` if it is a number of seconds, 0 or more, or None: a NaN deadline never comes,
    and a negative one (``filelock``'s "wait for ever") would give up at once.

    :raises ValueError: it is not."""
    return None if value is None else _seconds(what, value, ", or None (no limit)")


def validate_duration(what: str, value: object) -> float:
    """:func:`validate_seconds` for a duration that must be given (None is refused too)."""
    return _seconds(what, value, "")


def _seconds(what: str, value: object, or_none: str) -> float:
    seconds = float("nan")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number: Any = value  # (numbers.Real declares no comparison)
        try:
            seconds = float(number)
        except OverflowError:  # an int past float's range (10**400): for ever, if positive
            seconds = math.inf if number > 0 else -math.inf
    if not seconds >= 0:
        raise ValueError(f"{what} must be a number of seconds, 0 or more{or_none}, not {value!r}")
    return seconds


def app_task(app_id: str) -> str:
    """The lock for operations on one app: ``app_task:<app_id>``."""
    return validate_name(f"app_task:{app_id}")


def full_backup(site_id: str) -> str:
    """The lock for a full backup to one backup site: ``full_backup:<site_id>``."""
    return validate_name(f"full_backup:{site_id}")


def platform_update() -> str:
    """The lock for the platform update."""
    return "platform_update"


def mail_restart() -> str:
    """The lock protecting recreation of the mail server container."""
    return "mail_restart"
