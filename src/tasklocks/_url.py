"""Which database: URLs (``sqlite:///path.db``, ``mysql://user:pass@host:port/db``,
``postgresql://user@host:port/db``, ``postgresql:///db`` for libpq's default host) and the default
one, for the stores, the CLI and the tasks."""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from tasklocks.errors import BadURL, quote

__all__ = ["ParsedURL", "check_table_name", "default_url", "masked", "parse_url"]

_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")


def check_table_name(table: str) -> str:
    """Table names are spliced into SQL, so only plain identifiers are allowed."""
    if _TABLE.fullmatch(table) is None:
        raise BadURL(
            f"bad table name {quote(table)}: use letters, digits and _ (not first a digit)"
        )
    return table


def default_url() -> str:
    """``$TASKLOCKS_DB``, else an SQLite file in the user's state directory."""
    env = os.environ.get("TASKLOCKS_DB")
    if env:
        return env
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return "sqlite:///" + str(Path(state) / "tasklocks" / "tasklocks.db")


@dataclass(frozen=True, slots=True)
class ParsedURL:
    scheme: str  # sqlite, mysql, postgresql
    path: str  # the SQLite file (sqlite only)
    # PostgreSQL's "" (postgresql:///db, postgresql://user@/db): libpq's default host, $PGHOST
    # or its Unix-socket directory, as psql and psycopg read such a URL. A server URL of
    # another scheme always has one.
    host: str
    port: int | None
    user: str | None
    password: str | None
    database: str
    query: dict[str, str]

    def display(self) -> str:
        if self.scheme == "sqlite":
            return f"sqlite:///{self.path}"
        user = f"{self.user}@" if self.user else ""
        host = self.host
        if host.startswith("/"):  # a Unix-socket directory, as libpq reads it: %2Fvar%2Frun...
            host = urllib.parse.quote(host, safe="")
        elif ":" in host:  # an IPv6 address, in brackets (RFC 3986), its zone's % as %25 (6874)
            host = f"[{host.replace('%', '%25')}]"
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}://{user}{host}{port}/{self.database}"


_SCHEMES = {
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mysql",
    "postgresql": "postgresql",
    "postgres": "postgresql",
}


# The TLS parameters a server URL's query may carry, passed to the driver as they are.
PG_TLS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl")  # libpq's names
MYSQL_TLS = ("ssl_ca", "ssl_cert", "ssl_key", "ssl_verify_cert", "ssl_verify_identity")  # PyMySQL
# Those that name a file (libpq's sslrootcert may also be "system": its trusted roots).
TLS_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "ssl_ca", "ssl_cert", "ssl_key")


# What follows the @ that ends a URL's user part: host[:port]/db, then the end or ?name=...
# (A prefix, so that trying every @ of a long URL takes linear time, not quadratic.)
# (The host may be empty: postgresql://user:pass@/db is libpq's default host.)
_AFTER_USER = re.compile(r"[^@/?#]*/[^/?#]*(?:\?(?:\w+=|\Z)|\Z)")


def masked(url: str) -> str:
    """``url`` for a message, its password shown as ``***``: a malformed URL is echoed back, and a
    password must never be. The password runs from the user's ``:`` to the ``@`` that ends the
    user's part: the first ``@`` followed by ``host[:port]/db`` (the host, if any, without
    ``@ / ? #``, the database without ``/ ? #``), then the URL's end or ``?name=``; else the last
    ``@``. So
    an ``@`` in the database or in a parameter is not taken for it, and one typed unescaped in a
    password is passed over: the rest of the password, then the host's ``@``, does not read so
    (unless the password has an ``@``, then a ``/``, then ``?name=``, as ``a@b/c?d=e`` has)."""
    scheme, sep, rest = url.partition("://")
    head, rest = (scheme + sep, rest) if sep else ("", url)
    ats = [i for i, c in enumerate(rest) if c == "@"]
    at = next((i for i in ats if _AFTER_USER.match(rest, i + 1)), ats[-1] if ats else -1)
    user, colon, _ = rest[: max(at, 0)].partition(":")
    return f"{head}{user}:***@{rest[at + 1 :]}" if colon else url


def _query(text: str, shown: str) -> dict[str, str]:
    """The parameters of a URL's query: each once, each with a value."""
    query: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
        if not key:
            raise BadURL(f"a parameter without a name (={value}) in the URL {shown}: remove it")
        if not value:
            raise BadURL(f"{key} in the URL {shown} has no value: write {key}=VALUE, or remove it")
        if key in query:
            raise BadURL(f"{key}= is given twice in the URL {shown}: keep one")
        query[key] = value
    return query


def _host(parts: urllib.parse.SplitResult, shown: str) -> str:
    """The URL's host, its escapes read as libpq reads them (``%2Fvar%2Frun%2Fpostgresql`` is the
    Unix-socket directory ``/var/run/postgresql``): a name in lower case, a directory as written."""
    written = parts.netloc.rpartition("@")[2]
    if written.startswith("["):  # an IPv6 address (and its %25zone)
        return _unquote(parts.hostname or "", shown)
    host = _unquote(written.partition(":")[0], shown)
    if ":" in host and not host.startswith("/"):  # (db%3Ax: it would not read back)
        raise BadURL(
            f"the database URL {shown} has a colon in its host ({quote(host)}): write an IPv6 "
            "address in brackets, [::1]"
        )
    return host if host.startswith("/") else host.lower()


def _unquote(host: str, shown: str) -> str:
    """A host's escapes, read as UTF-8: one that is not (%FF) is refused, not read as U+FFFD."""
    try:
        return urllib.parse.unquote(host, errors="strict")
    except UnicodeDecodeError:
        raise BadURL(
            f"the database URL {shown} has an escape in its host that is not UTF-8 "
            f"({quote(host)}): write the host in UTF-8"
        ) from None


_RAW = {"\t": "tab", "\r": "carriage return", "\n": "line break"}


def parse_url(url: str) -> ParsedURL:
    """Split a database URL; raise :class:`BadURL` (a usage error) if it is malformed. A message
    shows the URL without its password."""
    if not url:  # (an unset variable, as a rule: never the default database in silence)
        raise BadURL(
            "the database URL is empty: give one (sqlite:///path.db, mysql://..., "
            "postgresql://...), or none at all for $TASKLOCKS_DB or the default file"
        )
    shown = quote(masked(url))
    if "\0" in url:
        raise BadURL(f"the database URL {shown} has a NUL character: remove it")
    if "://" not in url:
        raise BadURL(
            f"bad database URL {shown}: use sqlite:///path.db, mysql://user:pass@host:port/db "
            "or postgresql://user@host:port/db"
        )
    scheme_raw = url.split("://", 1)[0].lower()
    scheme = _SCHEMES.get(scheme_raw)
    if scheme is None:
        raise BadURL(
            f"unsupported database URL scheme {quote(scheme_raw)}: use sqlite://, mysql://, "
            "mariadb:// or postgresql://"
        )
    if scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////abs/path.db, as in SQLAlchemy: the path is taken
        # as it is, a # in it too, and the query is all that follows the ?.
        path, _, text = url.split("://", 1)[1].partition("?")
        query = _query(text, shown)
        if path in ("", "/", "/:memory:"):  # (SQLAlchemy's in-memory database)
            raise BadURL(
                f"{shown} is an in-memory database, which is seen by one process only: use a "
                "file, sqlite:///relative.db or sqlite:////abs.db"
            )
        if path.startswith("/file:"):  # SQLite reads it as a URI (file::memory:, ?mode=...)
            raise BadURL(
                f"bad SQLite URL {shown}: SQLite takes a path beginning with file: as a URI; "
                "name the file, sqlite:///relative.db or sqlite:////abs.db"
            )
        if not path.startswith("/"):
            raise BadURL(f"bad SQLite URL {shown}: use sqlite:///relative.db or sqlite:////abs.db")
        return ParsedURL("sqlite", path[1:], "", None, None, None, "", query)
    if "#" in url:
        raise BadURL(
            f"the database URL {shown} has a fragment (#...), which tasklocks does not use: "
            "remove it (a # in a password or a name is written %23)"
        )
    raw = next((c for c in "\t\r\n" if c in url), None)
    if raw is not None:  # (urlsplit drops them, in silence: te<LF>st would be the database test)
        escape = f"%{ord(raw):02X}"
        raise BadURL(
            f"the database URL {shown} has a raw {_RAW[raw]}: remove it (write {escape} if it "
            "is part of a name or a password)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [ of an IPv6 address
        raise BadURL(f"bad database URL {shown}: {exc}; use scheme://host:port/db") from None
    query = _query(parts.query, shown)
    try:
        port = parts.port
    except ValueError:
        raise BadURL(
            f"bad port in database URL {shown}: use host:port with a number from 1 to 65535"
        ) from None
    if port == 0 or (port is None and parts.netloc.rpartition("@")[2].endswith(":")):
        raise BadURL(
            f"{'port 0' if port == 0 else 'an empty port'} in database URL {shown}: give the "
            "server's port (host:PORT/db), or none for the default one (host/db)"
        )
    database = urllib.parse.unquote(parts.path.lstrip("/"))  # ("my%20db": the database my db)
    host = _host(parts, shown)
    if not host and scheme == "mysql":  # (PyMySQL would take localhost over TCP, and MySQL's
        # own clients take "localhost" for the Unix socket, which tasklocks does not use)
        raise BadURL(
            f"bad database URL {shown}: it needs a host and a database, mysql://host/db "
            "(127.0.0.1 for a server on this machine: tasklocks reaches MariaDB/MySQL over TCP)"
        )
    if not database:
        raise BadURL(
            f"bad database URL {shown}: it needs a database, {scheme}://host/db"
            + (" (or postgresql:///db on libpq's default host)" if scheme == "postgresql" else "")
        )
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    named = {"host": host, "user": user, "password": password, "database name": database}
    for what, value in named.items():
        if value and "\0" in value:  # (a driver would send it cut short, or fail obscurely)
            raise BadURL(
                f"the database URL {shown} has a NUL character (%00) in its {what}: remove it"
            )
    odd = next((c for c in host if c.isspace() or not c.isprintable()), None)
    if odd is not None:  # (DNS or the driver failed, after reconnect_timeout)
        raise BadURL(
            f"the database URL {shown} has a space or a control character "
            f"({urllib.parse.quote(odd)}) in its host: remove it"
        )
    if host.startswith("/") and scheme == "mysql":  # (PyMySQL takes a socket as unix_socket=)
        raise BadURL(
            f"the database URL {shown} names the Unix socket {quote(host)} as its host; "
            "tasklocks reaches MariaDB/MySQL over TCP: give host:port (from Python, a SQLAlchemy "
            "Engine made with unix_socket= may be passed to tasklocks.connect() instead)"
        )
    for key, value in query.items():
        if "\0" in key + value:
            raise BadURL(f"{key}= in the URL {shown} has a NUL character (%00): remove it")
    return ParsedURL(scheme, "", host, port, user, password, database, query)
