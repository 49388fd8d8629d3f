"""The servers' own floor (issue 10): tasklocks' two statements of a pair against the advisory
locks, each run by the server's C benchmark client (``pgbench``, ``mariadb-slap``), so that no
Python client cost is in either figure.

Each client takes and releases a name of its own (``:client_id``, ``CONNECTION_ID()``) with the
very statements tasklocks sends (``name_acquire``, and the release of a process that releases
often: ``name_release_unflushed`` on PostgreSQL, ``name_release_marked`` on MariaDB, from its SQL
files, the parameters written in), each its own commit (durable but those releases); a client
keeps one lease, so its MariaDB marker is the same lock taken again (counted) and never let go,
where tasklocks takes a new one a release and lets them go in batches; the peers do the same with
``pg_advisory_lock``/``pg_advisory_unlock`` and ``GET_LOCK``/``RELEASE_LOCK``, which write
nothing. What the ratio of the two says: how far the server's durable write path lets the
one-statement layout go against the advisory locks on this machine, whatever the client.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from bench_common import Config, tasklocks_sql

from tasklocks._url import parse_url

TABLE = "tasklocks"  # the table the bench's tasklocks pairs use
RECORD = "x" * 200  # about a real record's size (the text is not read)


def _statements(dialect: str, ns: str, name: str, lease: str) -> tuple[str, str]:
    sql = tasklocks_sql(dialect, TABLE)
    acquire = sql["name_acquire"]
    # What a session's lease releases with (PostgreSQL: without waiting for the flush; MariaDB,
    # in a process that releases often: its marker, which each client's connection keeps
    # until it ends, where tasklocks writes the rows free and lets them go every 64).
    release = sql.get("name_release_unflushed") or sql["name_release_marked"]
    values = {"ns": f"'{ns}'", "name": name, "lease": lease, "record": f"'{RECORD}'"}
    for key, value in values.items():  # (named parameters, in both dialects)
        acquire = acquire.replace(f"%({key})s", value)
        release = release.replace(f"%({key})s", value)
    return _one_line(acquire), _one_line(release)


def _one_line(sql: str) -> str:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return " ".join(" ".join(lines).split()).rstrip(";") + ";"


def _written(tmp: str, scripts: dict[str, str]) -> list[tuple[str, str]]:
    """Each script in a file of ``tmp``: (its kind, the file's path)."""
    paths = []
    for kind, script in scripts.items():
        path = os.path.join(tmp, f"{kind}.sql")
        with open(path, "w") as f:
            f.write(script)
        paths.append((kind, path))
    return paths


def pgbench(cfg: Config, clients: int, seconds: float) -> dict[str, float] | str:
    """Pairs/s of tasklocks' statements and of the advisory locks, ``clients`` at once."""
    tool = shutil.which("pgbench")
    if tool is None:
        return "no pgbench (Debian: postgresql-client)"
    url = parse_url(cfg.pg_url)
    ns = cfg.namespace("floor")
    acquire, release = _statements(
        "postgres", ns, "'w' || :client_id", f"'{cfg.run_id}' || :client_id"
    )
    scripts = {
        "rows": f"{acquire}\n{release}\n",
        "advisory": "SELECT pg_advisory_lock(:client_id + 900000);\n"
        "SELECT pg_advisory_unlock(:client_id + 900000);\n",
    }
    layout = f"INSERT INTO {TABLE}_names VALUES ('{ns}', '', 1, NULL, NULL, true) "
    layout += "ON CONFLICT DO NOTHING;"
    args = ["-h", url.host, "-p", str(url.port or 5432), "-U", url.user or "postgres"]
    cleanup = f"DELETE FROM {TABLE}_names WHERE namespace = '{ns}'"
    env = {**os.environ, "PGPASSWORD": url.password or ""}
    how = ["-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(max(1, round(seconds)))]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in _written(tmp, scripts):
            if kind == "rows":
                subprocess.run(
                    ["psql", *args, "-d", url.database, "-qc", layout],
                    check=True,
                    env=env,
                    capture_output=True,
                )
            run = subprocess.run(
                [tool, *args, *how, "-f", path, url.database],
                env=env,
                capture_output=True,
                text=True,
            )
            found = re.search(r"^tps = ([0-9.]+)", run.stdout, re.M)
            if run.returncode != 0 or found is None:
                return f"pgbench failed: {(run.stderr or run.stdout).strip().splitlines()[-1]}"
            out[kind] = float(found.group(1))
        subprocess.run(
            ["psql", *args, "-d", url.database, "-qc", cleanup],
            env=env,
            capture_output=True,
        )
    return out


def slap(cfg: Config, clients: int, pairs_each: int) -> dict[str, float] | str:
    """The same on MariaDB with ``mariadb-slap`` (``pairs_each`` pairs per client)."""
    tool = shutil.which("mariadb-slap") or shutil.which("mysqlslap")
    if tool is None:
        return "no mariadb-slap (Debian: mariadb-client)"
    url = parse_url(cfg.mysql_url)
    ns = cfg.namespace("floor")
    me = "CONNECTION_ID()"
    acquire, release = _statements(
        "mysql", ns, f"CONCAT('w', {me})", f"CONCAT('{cfg.run_id}', {me})"
    )
    table = f"`{url.database}`.{TABLE}_names"
    # The ceiling of any release that writes nothing durable (MariaDB has no per-transaction
    # async commit; a MEMORY table would be one): one durable write of the name's row a pair
    # (its version and record, as an acquisition writes them), then a round trip that writes
    # nothing. (Its own names, so that it starts from no row, as the pairs do.)
    one = f"CONCAT('v', {me})"
    scripts = {
        "rows": f"{acquire}\n{release}\n",
        "advisory": f"SELECT GET_LOCK(CONCAT('floor{cfg.run_id}', {me}), 10);\n"
        f"SELECT RELEASE_LOCK(CONCAT('floor{cfg.run_id}', {me}));\n",
        "one_write": f"INSERT INTO {table} (namespace, name, version, lease, record, mark) "
        f"VALUES ('{ns}', {one}, 1, NULL, '{RECORD}', 0) ON DUPLICATE KEY UPDATE "
        "version = version + 1, record = VALUES(record);\nDO 0;\n",
    }
    args = ["-h", url.host, "-P", str(url.port or 3306), "-u", url.user or "root"]
    if url.password:
        args.append(f"-p{url.password}")
    layout = f"INSERT IGNORE INTO {table} VALUES ('{ns}', '', 1, NULL, NULL, 1)"
    cleanup = f"DELETE FROM {table} WHERE namespace = '{ns}'"
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in _written(tmp, scripts):
            run = subprocess.run(
                [tool, *args, f"--create-schema={url.database}", f"--concurrency={clients}"]
                + ["--iterations=1", f"--number-of-queries={2 * pairs_each * clients}"]
                + [f"--query={path}", "--delimiter=\n"]
                + ([f"--pre-query={layout}"] if kind == "rows" else [])
                + ([f"--post-query={cleanup}"] if kind != "advisory" else []),
                capture_output=True,
                text=True,
            )
            found = re.search(r"run all queries: ([0-9.]+) seconds", run.stdout)
            if run.returncode != 0 or found is None:
                return f"mariadb-slap failed: {(run.stderr or run.stdout).strip()[-200:]}"
            out[kind] = pairs_each * clients / float(found.group(1))
    return out
