"""``tasklocks.django``: the database of a Django alias, with a connection of tasklocks' own.

The URL mapping is checked on settings dicts; a real Django project (settings configured in a
child process, Django's own connection used beside ours) checks that a lock taken inside
``atomic()`` stays taken when the block rolls back, on every backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS, require, server_url

from tasklocks.django import url_for
from tasklocks.errors import BadURL
from tasklocks.store import parse_url

pytest.importorskip("django")


def _pg(**more: Any) -> dict[str, Any]:
    return {"ENGINE": "django.db.backends.postgresql", "NAME": "app", **more}


@pytest.mark.parametrize(
    ("db", "url"),
    [
        (_pg(USER="web", HOST="db", PORT=5433), "postgresql://web@db:5433/app"),
        # An empty HOST: libpq's default host ($PGHOST, else the Unix socket), where Django's
        # own connection goes (it was 127.0.0.1, over TCP, whose sign-in may differ).
        (_pg(), "postgresql:///app"),
        (_pg(HOST="", PORT=5433), "postgresql://:5433/app"),
        (_pg(USER="web", HOST=None), "postgresql://web@/app"),
        (_pg(USER="web", PASSWORD="p@ss:w/rd"), "postgresql://web:p%40ss%3Aw%2Frd@/app"),
        (_pg(DISABLE_SERVER_SIDE_CURSORS=True), "postgresql:///app?pool=transaction"),
        (_pg(OPTIONS={"connect_timeout": 3}), "postgresql:///app?connect_timeout=3"),
        (_pg(HOST="localhost"), "postgresql://localhost/app"),
        (_pg(HOST="::1", PORT=5432), "postgresql://[::1]:5432/app"),
        (
            _pg(OPTIONS={"sslmode": "verify-full", "sslrootcert": "/ca.pem", "isolation_level": 1}),
            "postgresql:///app?sslmode=verify-full&sslrootcert=%2Fca.pem",
        ),
        (_pg(OPTIONS={"connect_timeout": 0}), "postgresql:///app"),
        # Other libpq options concern Django's own connections.
        (_pg(OPTIONS={"options": "-c statement_timeout=5000"}), "postgresql:///app"),
        (_pg(OPTIONS={"options": "-c application_name=search-path-sync"}), "postgresql:///app"),
        # (libpq's Unix-socket directory, as tasklocks' URLs write it: it was refused)
        (_pg(HOST="/var/run/postgresql"), "postgresql://%2Fvar%2Frun%2Fpostgresql/app"),
        (
            {
                "ENGINE": "django.db.backends.mysql",
                "NAME": "app",
                "OPTIONS": {"ssl": {"ca": "/ca.pem"}, "connect_timeout": 0.5},
            },
            "mysql://127.0.0.1/app?ssl_ca=%2Fca.pem&connect_timeout=0.5",
        ),
        (
            {"ENGINE": "django.contrib.gis.db.backends.postgis", "NAME": "app", "HOST": "db"},
            "postgresql://db/app",
        ),
        (
            # (MySQL's empty HOST stays 127.0.0.1: tasklocks reaches it over TCP; see url_for)
            {"ENGINE": "django.contrib.gis.db.backends.mysql", "NAME": "app", "USER": "root"},
            "mysql://root@127.0.0.1/app",
        ),
        (
            {"ENGINE": "django.db.backends.mysql", "NAME": "app", "USER": "root", "PORT": "3306"},
            "mysql://root@127.0.0.1:3306/app",
        ),
        (
            {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/db.sqlite3"},
            "sqlite:////srv/db.sqlite3",
        ),
    ],
)
def test_an_alias_becomes_a_tasklocks_url(db: dict[str, Any], url: str) -> None:
    assert url_for("default", {"default": db}) == url
    parsed = parse_url(url)  # and tasklocks reads it back as meant
    if parsed.scheme != "sqlite":
        assert parsed.database == "app"
        assert parsed.password == db.get("PASSWORD")


@pytest.mark.parametrize(
    ("databases", "problem"),
    [
        ({"other": _pg()}, "Django has no database 'default'; use one of other"),
        ({"default": {"ENGINE": "django.db.backends.oracle"}}, "cannot use Django's"),
        (
            {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            "no SQLite file",
        ),
        # (These made URLs tasklocks refused with a complaint about a URL nobody wrote, or
        # connected without what they say: a socket, a service file, TLS demanded.)
        (
            {"default": {"ENGINE": "django.db.backends.mysql", "NAME": "app", "HOST": "/run/m"}},
            "through the Unix socket",
        ),
        ({"default": _pg(OPTIONS={"sslpassword": "x"})}, r"OPTIONS\['sslpassword'\]"),
        ({"default": _pg(OPTIONS={"service": "app"})}, r"OPTIONS\['service'\]"),
        ({"default": _pg(OPTIONS={"host": "db.internal"})}, r"OPTIONS\['host'\]"),
        # (Dropped before: tasklocks' tables in another schema, or on another kind of server.)
        (
            {"default": _pg(OPTIONS={"options": "-c search_path=app,public"})},
            r"OPTIONS\['options'\].*sets search_path.*ALTER ROLE",
        ),
        ({"default": _pg(OPTIONS={"options": "--Search-Path=app"})}, "sets search_path"),
        ({"default": _pg(OPTIONS={"options": "-crole=app"})}, "sets role"),
        (
            {"default": _pg(OPTIONS={"options": "-c session_authorization='app'"})},
            "sets session_authorization",
        ),
        ({"default": _pg(OPTIONS={"assume_role": "app"})}, r"OPTIONS\['assume_role'\]"),
        (
            {"default": _pg(OPTIONS={"target_session_attrs": "read-write"})},
            r"OPTIONS\['target_session_attrs'\]",
        ),
        (
            {
                "default": {
                    "ENGINE": "django.db.backends.mysql",
                    "NAME": "app",
                    "OPTIONS": {"ssl_mode": "REQUIRED"},
                }
            },
            r"OPTIONS\['ssl_mode'\]",
        ),
        (
            {
                "default": {
                    "ENGINE": "django.db.backends.mysql",
                    "NAME": "app",
                    "OPTIONS": {"read_default_file": "/etc/my.cnf"},
                }
            },
            r"OPTIONS\['read_default_file'\]",
        ),
    ],
)
def test_an_alias_tasklocks_cannot_use_is_a_bad_url(
    databases: dict[str, Any], problem: str
) -> None:
    with pytest.raises(BadURL, match=problem):
        url_for("default", databases)


def test_a_database_name_with_spaces_comes_back_as_it_was() -> None:
    url = url_for("default", {"default": _pg(NAME="my app/db")})
    assert url == "postgresql:///my%20app%2Fdb"
    assert parse_url(url).database == "my app/db"  # (it was read back as my%20app%2Fdb)


def test_a_backend_that_wraps_a_known_one_is_known_by_its_vendor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third-party backend (a wrapper of Django's PostgreSQL one, say) is known by its
    ``DatabaseWrapper.vendor``; one whose vendor tasklocks does not speak is refused."""
    for package, vendor in (("wrapped_pg", "postgresql"), ("wrapped_oracle", "oracle")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "base.py").write_text(
            f"class DatabaseWrapper:\n    vendor = {vendor!r}\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert url_for("default", {"default": {"ENGINE": "wrapped_pg", "NAME": "app"}}) == (
        "postgresql:///app"
    )
    with pytest.raises(BadURL, match="cannot use Django's wrapped_oracle ENGINE"):
        url_for("default", {"default": {"ENGINE": "wrapped_oracle", "NAME": "app"}})
    with pytest.raises(BadURL, match="cannot use Django's no_such_backend ENGINE"):
        url_for("default", {"default": {"ENGINE": "no_such_backend", "NAME": "app"}})


PROJECT = textwrap.dedent(
    """
    import json, sys
    db = json.loads(sys.argv[1])
    if db["ENGINE"].endswith("mysql"):  # Django's MySQL backend on PyMySQL (no mysqlclient here)
        import pymysql
        pymysql.version_info = (2, 2, 7, "final", 0)
        pymysql.install_as_MySQLdb()
    import django
    from django.conf import settings
    settings.configure(DATABASES={"default": db})
    django.setup()
    from django.db import connection, transaction
    from tasklocks.django import connect
    locks = connect("default", namespace=sys.argv[2])
    class Undo(Exception):
        pass
    try:
        with transaction.atomic():
            with connection.cursor() as cur:  # the project's own work, rolled back below
                cur.execute("SELECT 1")
            lease = locks.acquire("report", owner="task:1")
            raise Undo
    except Undo:
        pass
    held = [h.name for h in locks.held()]  # read through tasklocks' own connection
    lease.release()
    print(json.dumps({"held": held, "after": [h.name for h in locks.held()]}))
    locks.close()
    """
)


def _settings(backend: str, tmp_path: Path) -> dict[str, Any]:
    if backend == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "db.sqlite3")}
    p = parse_url(server_url(backend.removesuffix(" without a host")))
    engine = "mysql" if backend == "mysql" else "postgresql"
    return {
        "ENGINE": f"django.db.backends.{engine}",
        "NAME": p.database,
        "USER": p.user or ("root" if backend == "mysql" else "postgres"),
        "PASSWORD": p.password or "",
        "HOST": "" if backend.endswith(" without a host") else p.host,
        "PORT": p.port or "",
    }


@pytest.mark.parametrize("backend", [*BACKENDS, "postgresql without a host"])
def test_a_lock_taken_in_a_rolled_back_atomic_block_stays_taken(
    backend: str, namespace: str, tmp_path: Path
) -> None:
    """(Without a HOST, Django's PostgreSQL connection and tasklocks' go through libpq's
    default host, the Unix socket here.)"""
    server = backend.removesuffix(" without a host")
    require(server)
    p = parse_url(server_url(server)) if server != "sqlite" else None
    if (
        server != backend
        and p is not None
        and (
            p.host not in ("127.0.0.1", "localhost", "::1")
            or not os.path.exists(f"/var/run/postgresql/.s.PGSQL.{p.port or 5432}")
        )
    ):
        pytest.skip(f"no Unix socket of the server at {p.display()} in /var/run/postgresql")
    env = {k: v for k, v in os.environ.items() if k not in ("PGHOST", "PGPORT")}
    out = subprocess.run(
        [sys.executable, "-c", PROJECT, json.dumps(_settings(backend, tmp_path)), namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"held": ["report"], "after": []}
