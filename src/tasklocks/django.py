"""Django: tasklocks on the database a Django project already uses.

::

    from tasklocks.django import connect

    locks = connect("default", namespace="myapp")   # settings.DATABASES["default"]

Django's connection is per thread and lives inside the project's transactions (``atomic()``,
``ATOMIC_REQUESTS``): a lock written through it would commit or roll back with the request's
work, and a waiting ``acquire`` would keep a transaction open. So tasklocks takes the alias's
database *settings* (engine, name, host, port, user, password) and keeps its own connection,
outside every transaction of the project: a lock taken inside ``atomic()`` stays taken when the
block rolls back. (On SQLite the lock table is in the alias's file, whose one write lock a block
keeps from its first write: tasklocks' writes wait for it; see README.)
``DISABLE_SERVER_SIDE_CURSORS`` (what Django asks for behind PgBouncer in transaction pooling)
turns on ``?pool=transaction``. Django itself is imported only when these
functions are called.
"""

from __future__ import annotations

import importlib
import os
import shlex
import urllib.parse
from collections.abc import Mapping
from typing import Any

from tasklocks._session import DEFAULT_TTL
from tasklocks._url import PG_TLS
from tasklocks.errors import BadURL
from tasklocks.locks import LockTable
from tasklocks.locks import connect as _connect

__all__ = ["connect", "url_for"]

_SCHEMES = {
    "django.db.backends.postgresql": "postgresql",
    "django.db.backends.mysql": "mysql",
    "django.db.backends.sqlite3": "sqlite",
    # GeoDjango's backends are these databases (tasklocks' tables need no spatial extension).
    "django.contrib.gis.db.backends.postgis": "postgresql",
    "django.contrib.gis.db.backends.mysql": "mysql",
    "django.contrib.gis.db.backends.spatialite": "sqlite",
}
_VENDORS = {"postgresql": "postgresql", "mysql": "mysql", "sqlite": "sqlite"}
# OPTIONS that choose where to connect or how to sign in: tasklocks' own connection cannot carry
# them, and without them it would connect elsewhere. (TLS options are carried into the URL;
# others, such as isolation_level or init_command, concern the project's connections only.)
_NOT_CARRIED = (
    *("host", "port", "user", "password", "passwd", "db", "database", "dbname"),
    *("service", "passfile", "read_default_file", "read_default_group", "unix_socket"),
    "target_session_attrs",  # (which of several servers, or what kind of server, libpq takes)
    "assume_role",  # (Django's SET ROLE: another role, whose schema "$user" may be)
)
# Settings in libpq's ``options`` that choose where tasklocks' tables would be: the schema, or
# the role whose schema the default search_path ("$user", public) names.
_WHERE_SETTINGS = {"search_path", "role", "session_authorization"}
_MYSQL_SSL = {"ca": "ssl_ca", "cert": "ssl_cert", "key": "ssl_key"}  # Django's OPTIONS["ssl"]


def url_for(
    alias: str = "default", databases: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """The tasklocks URL of a Django database alias (``databases`` defaults to the project's
    ``settings.DATABASES``). An empty ``HOST`` is, for PostgreSQL, libpq's default host, as
    Django's connection has it (``postgresql:///db``: ``$PGHOST``, else the Unix socket); for
    MySQL/MariaDB, 127.0.0.1 (tasklocks reaches them over TCP).

    :raises BadURL: no such alias, or an engine tasklocks does not speak."""
    if databases is None:
        databases = importlib.import_module("django.conf").settings.DATABASES
    if alias not in databases:
        raise BadURL(f"Django has no database {alias!r}; use one of {', '.join(databases)}")
    db = databases[alias]
    engine = str(db.get("ENGINE", ""))
    scheme = _SCHEMES.get(engine) or _vendor(engine)
    if scheme is None:
        raise BadURL(
            f"tasklocks cannot use Django's {engine or 'empty'} ENGINE of database {alias!r}; "
            "use PostgreSQL, MySQL/MariaDB or SQLite"
        )
    name = str(db.get("NAME") or "")
    if scheme == "sqlite":
        if not name or name == ":memory:" or name.startswith("file:"):
            raise BadURL(f"Django's database {alias!r} is no SQLite file; tasklocks needs one")
        return "sqlite:///" + os.path.abspath(name)
    quote = urllib.parse.quote
    user = quote(str(db.get("USER") or ""), safe="")
    password = quote(str(db.get("PASSWORD") or ""), safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    # An empty HOST: Django's PostgreSQL backend passes psycopg no host, and libpq takes its
    # default ($PGHOST, else the Unix socket, whose sign-in may differ from TCP's): so does the
    # URL (postgresql:///db). Its MySQL backend (mysqlclient) takes localhost, which libmysql
    # reads as the Unix socket; tasklocks reaches MariaDB/MySQL over TCP and takes 127.0.0.1,
    # the same server as a rule (an account that signs in by the socket alone, unix_socket,
    # cannot be used over TCP: pass tasklocks.connect() an Engine made with unix_socket=).
    host = str(db.get("HOST") or ("" if scheme == "postgresql" else "127.0.0.1"))
    if host.startswith("/") and scheme == "postgresql":
        host = quote(host, safe="")  # libpq's Unix-socket directory, as a URL writes it
    elif host.startswith("/"):
        raise BadURL(
            f"Django's database {alias!r} connects through the Unix socket {host}; tasklocks "
            "reaches MariaDB/MySQL over TCP: set HOST (127.0.0.1), or pass tasklocks.connect() "
            "a URL"
        )
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    port = f":{db['PORT']}" if db.get("PORT") else ""
    query = {}
    if scheme == "postgresql" and db.get("DISABLE_SERVER_SIDE_CURSORS"):
        query["pool"] = "transaction"
    options = db.get("OPTIONS") or {}

    def refuse(key: str) -> BadURL:
        return BadURL(
            f"tasklocks.django cannot carry OPTIONS[{key!r}] of Django's database {alias!r} "
            "to tasklocks' own connection; pass tasklocks.connect() a SQLAlchemy Engine or a "
            "URL for the same database"
        )

    for key, value in options.items():
        if key in _NOT_CARRIED:
            raise refuse(key)
        where = _settings(str(value)) & _WHERE_SETTINGS if key == "options" else set()
        if scheme == "postgresql" and where:
            raise BadURL(
                f"tasklocks.django cannot carry OPTIONS['options'] of Django's database "
                f"{alias!r}, which sets {', '.join(sorted(where))}, to tasklocks' own "
                "connection (its tables would be in another schema); set it for the role "
                "instead (ALTER ROLE ... SET search_path = ...), or pass tasklocks.connect() a "
                "SQLAlchemy Engine"
            )
        if scheme == "postgresql" and key in PG_TLS:
            query[key] = str(value)
        elif key.startswith("ssl") and key != "ssl":  # (MySQL's ssl_mode, say)
            raise refuse(key)
        elif scheme == "mysql" and key == "ssl":
            ssl = dict(value) if isinstance(value, Mapping) else {}
            if not ssl or set(ssl) - set(_MYSQL_SSL):
                raise refuse("ssl")
            query.update({_MYSQL_SSL[k]: str(v) for k, v in ssl.items()})
    timeout = options.get("connect_timeout")
    if timeout is not None and str(timeout) not in ("0", "0.0"):  # (0: libpq's "no limit")
        query["connect_timeout"] = str(timeout)  # (open_store checks the rest)
    tail = "?" + urllib.parse.urlencode(query) if query else ""
    return f"{scheme}://{auth}{host}{port}/{quote(name, safe='')}{tail}"


def _settings(options: str) -> set[str]:
    """The names of the settings libpq's ``options`` set (``-c name=value``, ``-cname=value``,
    ``--name=value``; a name read without case, a dash as an underscore, as the server reads
    them). Options that do not read (an unclosed quote) set nothing tasklocks can tell."""
    try:
        words = shlex.split(options)
    except ValueError:
        return set()
    names: set[str] = set()
    for at, word in enumerate(words):
        if word == "-c":
            word = "--" + words[at + 1] if at + 1 < len(words) else ""
        elif word.startswith("-c"):
            word = "--" + word[2:]
        if word.startswith("--") and "=" in word:
            names.add(word[2:].split("=", 1)[0].lower().replace("-", "_"))
    return names


def _vendor(engine: str) -> str | None:
    """The database behind a backend tasklocks does not know by name (a wrapper of Django's
    own, say), from its ``DatabaseWrapper.vendor``; None if it cannot tell."""
    if not engine:
        return None
    try:
        wrapper = importlib.import_module(f"{engine}.base").DatabaseWrapper
    except Exception:  # (not importable here: its driver, or Django, is missing)
        return None
    return _VENDORS.get(str(getattr(wrapper, "vendor", "")))


def connect(
    alias: str = "default",
    namespace: str = "default",
    *,
    ttl: float = DEFAULT_TTL,
    reconnect_timeout: float = 5.0,
) -> LockTable:
    """:func:`tasklocks.connect` on the database of Django's ``alias``, with a connection of
    its own (see the module docstring)."""
    return _connect(url_for(alias), namespace, ttl=ttl, reconnect_timeout=reconnect_timeout)
