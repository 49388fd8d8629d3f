"""The command line, as real subprocesses: exit codes, stderr lines, --json output, and ``run``.

Tests that take ``db_url`` run once per backend (SQLite, MariaDB/MySQL, PostgreSQL; unreachable
servers are skipped); the others run on a fresh SQLite file. Nothing here passes by sleeping:
tests wait for a condition (a marker file, a line on stderr, a process ending) with a deadline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import pg_url_without_host, require, server_url

from tasklocks import connect, process_identity
from tasklocks._url import TLS_FILES, masked, parse_url
from tasklocks.errors import BadURL, StoreUnavailable

PY = sys.executable
DEADLINE = 30.0  # seconds any awaited condition may take before the test fails
ENV = {k: v for k, v in os.environ.items() if k != "TASKLOCKS_DB"}
HOST = socket.gethostname()
# A file of CA certificates (Debian's ca-certificates, which Chromium's packages pull in).
CA_FILE = ssl.get_default_verify_paths().openssl_cafile
JSON_FIELDS = {
    *("name", "owner", "pid", "host", "since", "since_epoch", "token", "state", "expires_in"),
    *("note", "mode", "limit"),
}

# Command snippets for `run`. Markers are written to a temporary name and renamed into place,
# so a reader never sees a half-written file.
WRITE = (
    "def mark(path, text=''):\n"
    "    with open(path + '.tmp', 'w') as f:\n"
    "        f.write(text)\n"
    "    os.replace(path + '.tmp', path)\n"
)

HOLD_UNTIL_STOP = (
    "import os, sys, time\n" + WRITE + "d = sys.argv[1]\n"
    "mark(os.path.join(d, 'started'), str(os.getpid()))\n"
    "while not os.path.exists(os.path.join(d, 'stop')):\n"
    "    time.sleep(0.01)\n"
    "mark(os.path.join(d, 'done'))\n"
)

LOOK_FROM_INSIDE = (
    "import json, os, subprocess, sys\n"
    "url, ns = sys.argv[1:3]\n"
    "base = [sys.executable, '-m', 'tasklocks', '--db', url, '--namespace', ns]\n"
    "look = subprocess.run(base + ['locks', '--json'],\n"
    "                      capture_output=True, text=True, check=True)\n"
    "probe = subprocess.run(base + ['acquire', 'x', '--owner', 'probe'],\n"
    "                       capture_output=True, text=True)\n"
    "print(json.dumps({'pid': os.getpid(), 'locks': json.loads(look.stdout),\n"
    "                  'probe': probe.returncode, 'probe_err': probe.stderr}))\n"
)

TRAP_SIGNAL = (
    "import os, signal, sys\n" + WRITE + "d, signame = sys.argv[1:3]\n"
    "def on_signal(signum, frame):\n"
    "    mark(os.path.join(d, 'got'), signal.Signals(signum).name)\n"
    "    sys.exit(0)\n"
    "signal.signal(getattr(signal, signame), on_signal)\n"
    "mark(os.path.join(d, 'ready'), str(os.getpid()))\n"
    "while True:\n"
    "    signal.pause()\n"
)


# --- helpers ------------------------------------------------------------------------------------


def tasklocks(url: str, namespace: str, *args: str) -> list[str]:
    return [PY, "-m", "tasklocks", "--db", url, "--namespace", namespace, *args]


def cli(
    url: str, namespace: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tasklocks(url, namespace, *args),
        capture_output=True,
        text=True,
        env=ENV if env is None else env,
        timeout=DEADLINE,
        check=False,
    )


def start(
    url: str,
    namespace: str,
    *args: str,
    stderr: Path | None = None,
    capture: bool = False,
    **kw: Any,
) -> subprocess.Popen[str]:
    """Start the command line in the background; stderr goes to a file to watch, stdout is
    captured only on request (a command that outlives ``run`` would keep a pipe open)."""
    err = subprocess.DEVNULL if stderr is None else stderr.open("w")
    try:
        return subprocess.Popen(
            tasklocks(url, namespace, *args),
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=err,
            text=True,
            env=ENV,
            **kw,
        )
    finally:
        if stderr is not None:
            err.close()  # type: ignore[union-attr]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (it must be exactly one, and no traceback)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tasklocks: "), result.stderr
    return lines[0]


def held(url: str, namespace: str) -> list[dict[str, Any]]:
    result = cli(url, namespace, "locks", "--json")
    assert result.returncode == 0, result.stderr
    locks: list[dict[str, Any]] = json.loads(result.stdout)
    return locks


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def process_ended(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (an orphan's reaper may be slow or absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for a started process; return its exit status and what it printed."""
    try:
        out, _ = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    return proc.returncode, out or ""


def stop(proc: subprocess.Popen[str] | None) -> None:
    """Kill a started process if it still runs (test cleanup)."""
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/locks.db"  # four slashes: an absolute path


# --- the basics ---------------------------------------------------------------------------------


def test_help_documents_exit_codes() -> None:
    result = subprocess.run(
        [PY, "-m", "tasklocks", "--help"], capture_output=True, text=True, env=ENV, check=False
    )
    assert result.returncode == 0
    for code in ("0", "75", "2", "69", "1", "130", "143", "127"):
        assert any(line.strip().startswith(code + " ") for line in result.stdout.splitlines())
    assert "run" in result.stdout and "acquire" in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = subprocess.run(
        [PY, "-m", "tasklocks"], capture_output=True, text=True, env=ENV, check=False
    )
    assert result.returncode == 2
    assert one_error_line(result) == (
        "tasklocks: the following arguments are required: COMMAND (see 'tasklocks --help')"
    )


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["--ttl", "abc", "locks"], "argument --ttl"),
        (["acquire", "a", "--owner", "me", "--timeout", "-1"], "argument --timeout"),
        (["acquire", "a"], "required: --owner"),
        (["locks", "--bogus"], "unrecognized arguments: --bogus"),
        (["locks", "\x1b[2J"], "unrecognized arguments: \\x1b[2J"),
    ],
)
def test_argparse_errors_are_one_line_naming_the_help(
    sqlite_url: str, namespace: str, args: list[str], complaint: str
) -> None:
    """Every error of the command line is one line, argparse's too (no usage block)."""
    result = cli(sqlite_url, namespace, *args)
    assert (result.returncode, result.stdout) == (2, "")
    line = one_error_line(result)
    assert complaint in line and line.endswith("--help')"), line


def test_locks_when_none_are_held(db_url: str, namespace: str) -> None:
    text = cli(db_url, namespace, "locks")
    assert (text.returncode, text.stdout, text.stderr) == (0, "no locks held\n", "")
    assert held(db_url, namespace) == []


def test_acquire_prints_token_and_locks_show_it(db_url: str, namespace: str) -> None:
    before = time.time()
    result = cli(db_url, namespace, "acquire", "a", "b", "--owner", "script:1", "--note", "nightly")
    assert result.returncode == 0, result.stderr
    token = int(result.stdout)
    assert token > 0

    text = cli(db_url, namespace, "locks")
    assert text.returncode == 0
    header, *rows = text.stdout.splitlines()
    assert header.split() == [
        *("NAME", "OWNER", "PID", "HOST", "SINCE", "TOKEN", "MODE", "STATE", "EXPIRES", "NOTE")
    ]
    assert [row.split()[:4] for row in rows] == [
        ["a", "script:1", "-", HOST],
        ["b", "script:1", "-", HOST],
    ]
    assert all(
        row.split()[-5:] == [str(token), "exclusive", "unknown", "-", "nightly"] for row in rows
    )

    locks = held(db_url, namespace)
    assert [lock["name"] for lock in locks] == ["a", "b"]
    for lock in locks:
        assert set(lock) == JSON_FIELDS
        assert lock["owner"] == "script:1"
        assert lock["pid"] is None  # the CLI process ends at once: no pid to judge
        assert lock["host"] == HOST
        assert lock["token"] == token
        assert lock["state"] == "unknown"
        assert lock["expires_in"] is None  # no process, no session: kept until released
        assert lock["note"] == "nightly"
        assert before - 1 <= lock["since_epoch"] <= time.time() + 1
        since = dt.datetime.fromisoformat(lock["since"])
        assert since.utcoffset() == dt.timedelta(0)
        assert abs(since.timestamp() - lock["since_epoch"]) < 0.001


def test_acquire_of_a_held_lock_exits_75_naming_the_holder(db_url: str, namespace: str) -> None:
    assert cli(db_url, namespace, "acquire", "x", "--owner", "first").returncode == 0
    result = cli(db_url, namespace, "acquire", "x", "--owner", "second")
    assert result.returncode == 75
    line = one_error_line(result)
    assert "x is held by first" in line and "--wait" in line
    assert result.stdout == ""


def test_acquire_wait_times_out_after_saying_what_it_waits_for(db_url: str, namespace: str) -> None:
    assert cli(db_url, namespace, "acquire", "x", "--owner", "first").returncode == 0
    result = cli(
        db_url, namespace, "acquire", "x", "--owner", "second", "--wait", "--timeout", "0.5"
    )
    assert result.returncode == 75
    waiting, gave_up = result.stderr.splitlines()
    assert waiting.startswith(f"waiting for x, held by first (on {HOST}) since ")
    assert gave_up.startswith("tasklocks: gave up after waiting 0.5s")


def test_acquire_wait_gets_the_lock_once_released(
    sqlite_url: str, namespace: str, tmp_path: Path
) -> None:
    assert cli(sqlite_url, namespace, "acquire", "x", "--owner", "first").returncode == 0
    err = tmp_path / "stderr"
    waiter = start(
        sqlite_url,
        namespace,
        "acquire",
        "x",
        "--owner",
        "second",
        "--wait",
        stderr=err,
        capture=True,
    )
    try:
        wait_until(lambda: "waiting for x" in err.read_text(), "the waiting line")
        assert waiter.poll() is None
        assert cli(sqlite_url, namespace, "release", "x", "--owner", "first").returncode == 0
        status, out = finish(waiter)
    finally:
        stop(waiter)
    assert status == 0
    assert int(out) > 0
    assert [(lock["name"], lock["owner"]) for lock in held(sqlite_url, namespace)] == [
        ("x", "second")
    ]


def test_bad_lock_name_exits_2_with_one_line(sqlite_url: str, namespace: str) -> None:
    result = cli(sqlite_url, namespace, "acquire", "no spaces!", "--owner", "me")
    assert result.returncode == 2
    assert "bad lock name" in one_error_line(result)


def test_bad_namespace_exits_2_with_one_line(sqlite_url: str) -> None:
    result = cli(sqlite_url, "no spaces!", "locks")
    assert result.returncode == 2
    assert "bad namespace" in one_error_line(result)


@pytest.mark.parametrize(
    "url",
    [
        "foo://x",
        "sqlite:relative.db",
        "postgresql://host-without-db",
        "postgresql://postgres@[::1:5432/test",
        # A parameter tasklocks does not use was ignored (sslmode=verify-full connected without
        # checking the certificate; it is now passed on, see below).
        "postgresql://postgres@127.0.0.1:5432/test?application_name=x",
        "mysql://root@127.0.0.1:3306/test?charset=latin1",
        "mysql://root@127.0.0.1:3306/test?ssl_verify_cert=maybe",
        "sqlite:///x.db?mode=ro",
        "postgresql://postgres@127.0.0.1:5432/test?connect_timeout=soon",
        "mysql://root@127.0.0.1:3306/test?connect_timeout=0",
        "",  # (an unset variable: it was the default file, in silence)
    ],
)
def test_bad_url_exits_2_with_one_line(url: str, namespace: str) -> None:
    result = cli(url, namespace, "locks")
    assert result.returncode == 2
    assert "URL" in one_error_line(result)


def test_acquire_that_cannot_print_its_token_gives_the_lock_back(
    sqlite_url: str, namespace: str
) -> None:
    """(The token was lost and the lock stayed held, with exit 1 and not a word; with stdout
    closed, print() dropped the token and the exit was 0.)"""
    read, write = os.pipe()
    os.close(read)  # nobody reads: the token cannot be written (EPIPE)
    try:
        broken = subprocess.run(
            tasklocks(sqlite_url, namespace, "acquire", "x", "y", "--owner", "me"),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            timeout=DEADLINE,
            check=False,
        )
    finally:
        os.close(write)
    assert broken.returncode == 1
    assert broken.stderr == (
        "tasklocks: could not print the token (Broken pipe), so x, y were released again\n"
    )
    assert held(sqlite_url, namespace) == []
    command = shlex.join(tasklocks(sqlite_url, namespace, "acquire", "x", "--owner", "me"))
    closed = subprocess.run(
        ["bash", "-c", command + " >&-"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=DEADLINE,
        check=False,
    )
    assert closed.returncode == 2
    assert one_error_line(closed) == (
        "tasklocks: standard output is closed, and acquire prints the token there"
    )
    assert held(sqlite_url, namespace) == []


PASSWORD = "S3c@ret:PW"  # (the URLs below leave its @ unescaped, as one may mistype)
SECRETS = ("S3c", "PW")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"mysql:/root:{PASSWORD}@127.0.0.1/test", "bad database URL 'mysql:***@127.0.0.1/test'"),
        (f"sqlite://u:{PASSWORD}@x.db", "bad SQLite URL 'sqlite://u:***@x.db'"),
        (f"mysql://root:{PASSWORD}@[::1/test", "bad database URL 'mysql://root:***@[::1/test'"),
        (f"mysql://root:{PASSWORD}@127.0.0.1:abc/test", "bad port in database URL"),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/", "needs a database"),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432", "needs a database"),
        (f"mysql://root:{PASSWORD}@/test", "needs a host and a database"),
    ],
)
def test_a_bad_urls_message_never_shows_its_password(
    url: str, problem: str, namespace: str
) -> None:
    """A malformed URL is echoed back with its password as ***."""
    result = cli(url, namespace, "locks")
    assert result.returncode == 2, result
    line = one_error_line(result)
    assert problem in line, line
    assert "***@" in line, line
    assert not any(secret in line for secret in SECRETS), line


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # The cases above, and the plain ones.
        (f"mysql:/root:{PASSWORD}@127.0.0.1/test", "mysql:***@127.0.0.1/test"),
        (f"sqlite://u:{PASSWORD}@x.db", "sqlite://u:***@x.db"),
        (f"mysql://root:{PASSWORD}@[::1/test", "mysql://root:***@[::1/test"),
        (f"mysql://root:{PASSWORD}@127.0.0.1:abc/test", "mysql://root:***@127.0.0.1:abc/test"),
        (f"postgresql://pg:{PASSWORD}@127.0.0.1:5432/", "postgresql://pg:***@127.0.0.1:5432/"),
        (f"postgresql://pg:{PASSWORD}@127.0.0.1:5432", "postgresql://pg:***@127.0.0.1:5432"),
        ("mysql://root:S3c#PW@127.0.0.1/test", "mysql://root:***@127.0.0.1/test"),
        ("mysql://root:pw@h/db?charset=utf8mb4", "mysql://root:***@h/db?charset=utf8mb4"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("not a url", "not a url"),
        # An @ in the query or the path is not the user's: it hid the host and the path, or
        # made up a password where there was none.
        ("mysql://u:secret@h/db?ssl_ca=/etc/a@b.pem", "mysql://u:***@h/db?ssl_ca=/etc/a@b.pem"),
        (
            "mysql://u:secret@h/db?ssl_ca=/home/me@corp/ca.pem&ssl_verify_cert=true",
            "mysql://u:***@h/db?ssl_ca=/home/me@corp/ca.pem&ssl_verify_cert=true",
        ),
        ("postgresql://u@h/db?application_name=x@y", "postgresql://u@h/db?application_name=x@y"),
        (
            "postgresql://u@h/db?application_name=a:b@c",
            "postgresql://u@h/db?application_name=a:b@c",
        ),
        ("mysql://u:pw@h:3306/my@db", "mysql://u:***@h:3306/my@db"),
        ("mysql://u@h/my:db@x", "mysql://u@h/my:db@x"),
        ("mysql://u:pw@h/my@db?", "mysql://u:***@h/my@db?"),
        # Passwords typed by hand, with @ / ? # left unescaped, beside an @ in the query.
        ("mysql://u:pa/ss@h/db", "mysql://u:***@h/db"),
        ("mysql://u:P@ss#1@h/db?ssl_ca=/a@b.pem", "mysql://u:***@h/db?ssl_ca=/a@b.pem"),
        ("mysql://u:P@ss?1@h/db?ssl_ca=/a@b.pem", "mysql://u:***@h/db?ssl_ca=/a@b.pem"),
        ("mysql://u:a@b/c@h/db?ssl_ca=/a@b.pem", "mysql://u:***@h/db?ssl_ca=/a@b.pem"),
        ("mysql://u:P@ss/w?rd@h/db", "mysql://u:***@h/db"),
        ("mysql://u:P@ss/w#rd@h/db", "mysql://u:***@h/db"),
        ("mysql://u:@@@h/db?ssl_ca=/a@b.pem", "mysql://u:***@h/db?ssl_ca=/a@b.pem"),
        # No host (libpq's default), and an @ in the query: the password was read up to it.
        (
            "postgresql://u:pw@/db?sslrootcert=/a@b.pem",
            "postgresql://u:***@/db?sslrootcert=/a@b.pem",
        ),
        ("postgresql://u:pw@:5433/db?sslcert=/a@b", "postgresql://u:***@:5433/db?sslcert=/a@b"),
    ],
)
def test_masked_hides_the_password_alone(url: str, shown: str) -> None:
    assert masked(url) == shown


MY = f"mysql://root:{PASSWORD}@127.0.0.1"
MY_SHOWN = "'mysql://root:***@127.0.0.1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # Each was taken as something else, in silence: the default port, the parameter left
        # out, the last of two values, the URL before the #.
        (f"{MY}:0/test", f"port 0 in database URL {MY_SHOWN}:0/test': give the server's port"),
        (f"{MY}:/test", f"an empty port in database URL {MY_SHOWN}:/test': give the server's"),
        (f"{MY}/test?foo", f"foo in the URL {MY_SHOWN}/test?foo' has no value: write foo=VALUE"),
        (f"{MY}/test?charset=", "charset in the URL 'mysql://root:***@127.0.0.1/test?charset="),
        (f"{MY}/test?=5", f"a parameter without a name (=5) in the URL {MY_SHOWN}/test?=5'"),
        (
            f"{MY}/test?connect_timeout=abc&connect_timeout=5",
            "connect_timeout= is given twice in the URL 'mysql://root:***@127.0.0.1/test?connect",
        ),
        (f"{MY}/test#x", f"the database URL {MY_SHOWN}/test#x' has a fragment (#...)"),
        ("mysql://root:S3c#PW@127.0.0.1/test", "'mysql://root:***@127.0.0.1/test' has a fragm"),
        # (Dropped by urlsplit, in silence: the database test, user root, port 5432.)
        (f"{MY}/te\nst", f"the database URL {MY_SHOWN}/te\\nst' has a raw line break: remove"),
        ("mysql://ro\tot@127.0.0.1/test", "has a raw tab: remove it (write %09 if it is part"),
        ("postgresql://127.0.0.1:54\r32/test", "has a raw carriage return: remove it (write %0D"),
        (f"{MY}/te%00st", f"the database URL {MY_SHOWN}/te%00st' has a NUL character (%00) in"),
        (f"mysql://ro%00ot:{PASSWORD}@127.0.0.1/test", "(%00) in its user: remove it"),
        ("mysql://root:S3c%00PW@127.0.0.1/test", "(%00) in its password: remove it"),
        ("postgresql://postgres@127.0.0.1/test?sslrootcert=%00", "sslrootcert= in the URL"),
        # The host was sent to DNS as it was written, escapes and all (exit 69, after
        # reconnect_timeout): libpq reads escapes in a URL's host, and no host has these.
        (f"{MY}%00/test", f"{MY_SHOWN}%00/test' has a NUL character (%00) in its host: remove"),
        ("postgresql://postgres@db%0A.example/test", "a control character (%0A) in its host"),
        ("postgresql://postgres@db%20example/test", "a space or a control character (%20) in"),
        ("postgresql://postgres@db example/test", "a space or a control character (%20) in"),
        # (Read as U+FFFD, in silence, and sent to DNS so.)
        (
            "postgresql://postgres@db%FF.example/test",
            "has an escape in its host that is not UTF-8 ('db%FF.example'): write the host in",
        ),
        # (Read as the host db:x, which display() wrote as [db:x], which does not read back.)
        (
            "postgresql://postgres@db%3Ax/test",
            "has a colon in its host ('db:x'): write an IPv6 address in brackets, [::1]",
        ),
        (
            f"mysql://root:{PASSWORD}@%2Frun%2Fmysqld%2Fmysqld.sock/test",
            "names the Unix socket '/run/mysqld/mysqld.sock' as its host; tasklocks reaches "
            "MariaDB/MySQL over TCP: give host:port",
        ),
        # No host: PyMySQL would take localhost over TCP, MySQL's clients the Unix socket.
        *(
            (url, "it needs a host and a database, mysql://host/db (127.0.0.1 for a server on")
            for url in ("mysql:///test", "mysql://root@/test", "mariadb://root:pw@:3306/test")
        ),
        # (A URL without a host is libpq's default host; without a database, it is refused.)
        ("postgresql://postgres@/", "it needs a database, postgresql://host/db (or postgresql"),
    ],
)
def test_a_url_is_read_strictly(url: str, message: str, namespace: str) -> None:
    result = cli(url, namespace, "locks")
    assert result.returncode == 2, result
    line = one_error_line(result)
    assert line.startswith("tasklocks: ") and message in line, line
    assert not any(secret in line for secret in SECRETS), line


def test_an_sslmode_libpq_does_not_have_is_a_usage_error(namespace: str) -> None:
    """(libpq's refusal was tried again for reconnect_timeout, then exit 69 'did not answer'.)"""
    result = cli("postgresql://postgres@127.0.0.1:1/test?sslmode=bogus", namespace, "locks")
    assert result.returncode == 2, result
    assert one_error_line(result) == (
        "tasklocks: sslmode=bogus in the URL: use one of disable, allow, prefer, require, "
        "verify-ca, verify-full"
    )


def test_an_empty_url_is_refused_everywhere(namespace: str) -> None:
    """An empty URL never means the default database: a lock taken there would not be seen by
    the processes that use the database meant."""
    for args in (["start", "--", "true"], ["tasks"], ["acquire", "x", "--owner", "me"]):
        result = cli("", namespace, *args)
        assert result.returncode == 2, result
        assert one_error_line(result).startswith("tasklocks: the database URL is empty: give one")
    with pytest.raises(BadURL, match="the database URL is empty"):
        connect("")


def test_a_url_names_what_tasklocks_does_not_use_and_reads_an_escaped_database(
    tmp_path: Path,
) -> None:
    with pytest.raises(BadURL) as refused:
        connect("postgresql://postgres@127.0.0.1/test?application_name=x")
    assert str(refused.value) == (
        "the postgresql URL has application_name=, which tasklocks does not use (it takes "
        "connect_timeout, pool, sslmode, sslrootcert, sslcert, sslkey, sslcrl); remove it (from "
        "Python, a SQLAlchemy Engine made with it may be passed to tasklocks.connect() instead)"
    )
    with pytest.raises(
        BadURL, match=r"the sqlite URL has cache=, which tasklocks does not use \(it takes none\)"
    ):
        connect("sqlite:///x.db?cache=shared")
    with pytest.raises(BadURL, match="the sqlite URL has mode="):  # (a # in the path hid it)
        connect(f"sqlite:///{tmp_path}/a#b.db?mode=ro")
    assert parse_url("mysql://root@127.0.0.1/my%20db").database == "my db"


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("postgresql://u@DB.Example/test", "db.example"),  # (a name in lower case, as before)
        ("postgresql://u@db%2Dprimary.Example:5433/test", "db-primary.example"),
        ("mysql://u:pw@127.0.0.%31/test", "127.0.0.1"),
        ("postgresql://u@[::1]:5432/test", "::1"),
        # libpq's Unix-socket directory; its name keeps its case.
        ("postgresql://u@%2Fvar%2Frun%2Fpostgresql/test", "/var/run/postgresql"),
        ("postgresql://u:pw@%2ftmp%2FPg:5433/test", "/tmp/Pg"),
        # No host: libpq's default ($PGHOST, else its Unix socket), as psql reads the URL (it
        # was refused: "it needs a host and a database").
        ("postgresql:///test", ""),
        ("postgres://u:pw@/test", ""),
        ("postgresql://:5433/test", ""),
    ],
)
def test_the_escapes_of_a_urls_host_are_read(url: str, host: str) -> None:
    assert parse_url(url).host == host


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@[::1]:5432/test",  # (was postgresql://u@::1:5432/test)
        "mysql://u@[2001:db8::7]/test",
        "postgresql://u@[fe80::1%25eth0]:5433/test",  # (RFC 6874: the zone's % as %25)
        "postgresql://u@%2Fvar%2Frun%2Fpostgresql/test",
        "postgresql://u@db.example:5432/test",
        "postgresql:///test",  # (libpq's default host)
        "postgresql://u@/test",
        "postgresql://u@:5433/test",
    ],
)
def test_a_url_is_displayed_as_it_is_read(url: str) -> None:
    """``display()`` (messages, the dashboard, the log directory's hash) writes a URL that reads
    back as the same database: an IPv6 address in brackets."""
    assert parse_url(url).display() == url
    assert parse_url(parse_url(url).display()) == parse_url(url)


def test_a_server_at_an_ipv6_address_is_named_with_brackets() -> None:
    """The server in a message is host:port, an IPv6 address in brackets ([::1]:1, not
    ::1:1, whose port cannot be told from the address)."""
    from tasklocks.store._sql_server import _where

    assert _where(parse_url("postgresql://postgres@[::1]:1/test"), 5432) == "[::1]:1"
    assert _where(parse_url("mysql://root@[2001:db8::7]/test"), 3306) == "[2001:db8::7]:3306"
    assert _where(parse_url("mysql://root@127.0.0.1/test"), 3306) == "127.0.0.1:3306"


@pytest.mark.parametrize(
    ("backend", "query", "works"),
    [
        ("postgresql", "sslmode=disable&connect_timeout=0.5", True),
        # This server speaks no TLS: a URL that demands it is refused by the server, not
        # connected without it (the parameter was ignored before).
        ("postgresql", "sslmode=require", False),
        ("postgresql", "sslmode=verify-full", False),
        ("mysql", "charset=utf8mb4&connect_timeout=0.5", True),
        ("mysql", f"ssl_ca={CA_FILE}", False),
    ],
)
def test_a_urls_tls_parameters_reach_the_driver(
    backend: str, query: str, works: bool, namespace: str
) -> None:
    require(backend)
    started = time.monotonic()
    result = cli(server_url(backend) + "?" + query, namespace, "locks")
    if works:
        assert result.returncode == 0, result.stderr
    else:  # at once: TLS the server cannot give does not come by trying again
        assert result.returncode == 69, result
        assert time.monotonic() - started < 4.0  # (reconnect_timeout is 5 s)
        line = one_error_line(result)
        assert " refused TLS (" in line, line
        assert line.endswith("; check the URL's TLS parameters and the server's TLS setup")


@pytest.mark.parametrize(
    ("backend", "key"),
    [(b, k) for b in ("postgresql", "mysql") for k in TLS_FILES if (b == "mysql") == ("_" in k)],
)
def test_a_tls_file_that_is_not_there_is_a_usage_error(
    backend: str, key: str, namespace: str, tmp_path: Path
) -> None:
    missing = tmp_path / "ca.pem"
    url = f"{server_url(backend)}?{key}={missing}"
    result = cli(url, namespace, "acquire", "x", "--owner", "me")
    assert result.returncode == 2, result
    assert one_error_line(result) == (
        f"tasklocks: {key}={missing} in the URL: no such file; fix the path"
    )
    if key == "sslkey":  # libpq's ENGINE:KEY form names no file
        assert cli(f"{server_url(backend)}?sslkey=pkcs11:k", namespace, "locks").returncode == 0
    if key == "sslrootcert":  # libpq's word for its trusted roots is not a file
        with pytest.raises(StoreUnavailable, match="refused TLS"):
            connect(f"{server_url(backend)}?sslmode=verify-full&sslrootcert=system")


@pytest.mark.parametrize("ttl", ["0.5", "86401", "1e10", "1e301", "nan", "-1", "inf"])
def test_a_ttl_out_of_range_is_a_usage_error(sqlite_url: str, namespace: str, ttl: str) -> None:
    """The message gives the range, whatever is out of it (-1 said 'zero or more')."""
    result = cli(sqlite_url, namespace, "--ttl", ttl, "acquire", "x", "--owner", "me")
    assert result.returncode == 2
    assert one_error_line(result) == (
        f"tasklocks: argument --ttl: must be 1 to 86400 seconds: '{ttl}' (see 'tasklocks --help')"
    )
    assert held(sqlite_url, namespace) == []


def test_a_file_that_is_not_a_database_exits_69_naming_it(tmp_path: Path, namespace: str) -> None:
    path = tmp_path / "notes.db"
    path.write_text("hello\n")
    result = cli(f"sqlite:///{path}", namespace, "acquire", "x", "--owner", "me")
    assert result.returncode == 69
    line = one_error_line(result)
    assert f"{str(path)!r} is not an SQLite database" in line and "check the path" in line
    assert path.read_text() == "hello\n"  # left as it was
    assert sorted(tmp_path.iterdir()) == [path]  # (notes.db-lock, the writers' queue, was left)
    gate = tmp_path / "notes.db-lock"  # one that was there before is not this open's to remove
    gate.write_text("")
    assert cli(f"sqlite:///{path}", namespace, "locks").returncode == 69
    assert sorted(tmp_path.iterdir()) == [path, gate]


@pytest.mark.parametrize(
    "url", ["sqlite:///:memory:", "sqlite://", "sqlite:///", "sqlite:///file::memory:"]
)
def test_an_in_memory_sqlite_database_is_a_usage_error(
    url: str, namespace: str, tmp_path: Path
) -> None:
    """(It exited 69, 'put the lock table on a local filesystem', leaving a file ':memory:' and
    ':memory:-lock' in the working directory.)"""
    result = subprocess.run(
        tasklocks(url, namespace, "acquire", "x", "--owner", "me"),
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 2, result
    line = one_error_line(result)
    if "file:" in url:
        assert line == (
            f"tasklocks: bad SQLite URL {url!r}: SQLite takes a path beginning with file: as a "
            "URI; name the file, sqlite:///relative.db or sqlite:////abs.db"
        )
    else:
        assert line == (
            f"tasklocks: {url!r} is an in-memory database, which is seen by one process only: "
            "use a file, sqlite:///relative.db or sqlite:////abs.db"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_database_on_a_read_only_filesystem_exits_69(tmp_path: Path, namespace: str) -> None:
    """(It exited 1, "SQLite failed ...: unable to open database file".)"""
    folder = tmp_path / "ro"
    url = f"sqlite:///{folder / 'locks.db'}"
    assert cli(url, namespace, "acquire", "before", "--owner", "me").returncode == 0
    read_only = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    argv = [PY, "-m", "tasklocks", "--db", url, "--namespace", namespace, "acquire", "x"]
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", read_only, str(folder), *argv, "--owner", "me"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert result.returncode == 69, result.stderr
    line = one_error_line(result)
    assert "cannot use the SQLite lock table" in line and "writable" in line
    assert [lock["name"] for lock in held(url, namespace)] == ["before"]


def test_unreachable_server_exits_69_with_one_line(namespace: str) -> None:
    result = cli("postgresql://postgres@127.0.0.1:1/test", namespace, "locks")
    assert result.returncode == 69
    assert "127.0.0.1" in one_error_line(result)


def test_a_url_without_a_host_is_libpqs_default_host_for_the_command_line(
    namespace: str,
) -> None:
    """``postgresql://user@/db`` reaches the server as psql does (it was refused, exit 2); a
    server that is not there is named as libpq's default host."""
    require("postgresql")
    url = pg_url_without_host(server_url("postgresql"))
    p = parse_url(url)
    env = {k: v for k, v in ENV.items() if k not in ("PGHOST", "PGPORT")}
    taken = cli(url, namespace, "acquire", "job", "--owner", "me", env=env)
    assert taken.returncode == 0, taken.stderr
    assert [lock["name"] for lock in held(server_url("postgresql"), namespace)] == ["job"]
    assert cli(url, namespace, "release", "job", "--owner", "me").returncode == 0
    assert held(server_url("postgresql"), namespace) == []
    gone = cli(f"postgresql://{p.user or ''}@:1/{p.database}", namespace, "locks", env=env)
    assert gone.returncode == 69, gone.stderr
    line = one_error_line(gone)
    assert "PostgreSQL at libpq's default host (its Unix socket), port 1" in line, line
    assert "$PGHOST" in line, line


def test_a_mysql_server_that_never_answers_fails_within_the_connect_timeout(
    namespace: str,
) -> None:
    """A server that accepts the connection and never sends its greeting (a hung server, a
    proxy with nothing behind it): PyMySQL's connect_timeout bounded the TCP connect only, and
    the greeting was awaited for the 30 s read timeout, every try."""
    pytest.importorskip("pymysql")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # (closed at the end of the test)
            while True:
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        result = cli(f"mysql://root@127.0.0.1:{port}/test?connect_timeout=2", namespace, "locks")
        took = time.monotonic() - started
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # (wakes the accept)
        listener.close()
        thread.join(DEADLINE)
        for conn in accepted:
            conn.close()
    assert result.returncode == 69, result
    assert accepted  # it did connect: the wait was the greeting's
    assert took < 15.0, took  # (reconnect_timeout is 5 s; one try took 30 s)
    assert f"127.0.0.1:{port}" in one_error_line(result)


def test_db_defaults_to_the_environment(tmp_path: Path, namespace: str) -> None:
    url = f"sqlite:///{tmp_path}/from-env.db"
    env = {**ENV, "TASKLOCKS_DB": url}
    command = [PY, "-m", "tasklocks", "--namespace", namespace, "acquire", "x", "--owner", "me"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert [lock["name"] for lock in held(url, namespace)] == ["x"]


# --- release, reap, repair ----------------------------------------------------------------------


def test_release_by_the_wrong_owner_exits_1_naming_the_holder(db_url: str, namespace: str) -> None:
    assert cli(db_url, namespace, "acquire", "x", "--owner", "first").returncode == 0
    result = cli(db_url, namespace, "release", "x", "--owner", "second")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "x is held by first" in line and "not by second" in line
    assert [lock["owner"] for lock in held(db_url, namespace)] == ["first"]


def test_release_names_then_owner_lists_what_it_released(db_url: str, namespace: str) -> None:
    for name, owner in [("a", "o1"), ("b", "o1"), ("c", "o1"), ("d", "o2")]:
        assert cli(db_url, namespace, "acquire", name, "--owner", owner).returncode == 0
    one = cli(db_url, namespace, "release", "a", "--owner", "o1")
    assert (one.returncode, one.stdout) == (0, "a\n")
    rest = cli(db_url, namespace, "release", "--owner", "o1")
    assert (rest.returncode, sorted(rest.stdout.split())) == (0, ["b", "c"])
    assert [lock["name"] for lock in held(db_url, namespace)] == ["d"]
    nothing = cli(db_url, namespace, "release", "--owner", "o1")
    assert (nothing.returncode, nothing.stdout) == (0, "")


def test_release_needs_an_owner(sqlite_url: str, namespace: str) -> None:
    result = cli(sqlite_url, namespace, "release", "x")
    assert result.returncode == 2
    assert "--owner" in one_error_line(result)


def test_release_all_needs_yes(sqlite_url: str, namespace: str) -> None:
    for name, owner in [("a", "o1"), ("b", "o2")]:
        assert cli(sqlite_url, namespace, "acquire", name, "--owner", owner).returncode == 0
    refused = cli(sqlite_url, namespace, "release", "--all")
    assert refused.returncode == 2
    assert "add --yes" in one_error_line(refused)
    assert len(held(sqlite_url, namespace)) == 2
    done = cli(sqlite_url, namespace, "release", "--all", "--yes")
    assert (done.returncode, sorted(done.stdout.split())) == (0, ["a", "b"])
    assert held(sqlite_url, namespace) == []


def test_reap_releases_only_dead_holders(sqlite_url: str, namespace: str) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with connect(sqlite_url, namespace) as table:
            table.acquire("gone", owner="job:dead", process=process_identity(sleeper.pid))
            table.acquire("kept", owner="job:cli", process=None)
        assert cli(sqlite_url, namespace, "reap").stdout == "nothing to reap\n"
    finally:
        sleeper.kill()
        sleeper.wait()
    states = {lock["name"]: lock["state"] for lock in held(sqlite_url, namespace)}
    assert states == {"gone": "dead", "kept": "unknown"}
    result = cli(sqlite_url, namespace, "reap")
    assert result.returncode == 0
    assert result.stdout.startswith(f"reaped gone from job:dead (pid {sleeper.pid} on {HOST})")
    assert [lock["name"] for lock in held(sqlite_url, namespace)] == ["kept"]


def test_repair_needs_yes_and_prints_the_corrupt_document(
    sqlite_url: str, namespace: str, tmp_path: Path
) -> None:
    assert cli(sqlite_url, namespace, "acquire", "x", "--owner", "me").returncode == 0
    with sqlite3.connect(tmp_path / "locks.db") as db:
        db.execute("UPDATE tasklocks SET data = '{truncated' WHERE namespace = ?", (namespace,))
    db.close()
    broken = cli(sqlite_url, namespace, "locks")
    assert broken.returncode == 1
    assert "corrupt" in one_error_line(broken) and "repair --yes" in broken.stderr

    refused = cli(sqlite_url, namespace, "repair")
    assert refused.returncode == 2
    assert "add --yes" in one_error_line(refused)
    # A free name is taken in its own row, which the corrupt document cannot show: repair
    # names it as it releases it (it was dropped unseen).
    in_row = cli(sqlite_url, namespace, "acquire", "d", "--owner", "p")
    assert in_row.returncode == 0, in_row.stderr

    repaired = cli(sqlite_url, namespace, "repair", "--yes")
    assert repaired.returncode == 0, repaired.stderr
    assert "{truncated" in repaired.stdout.splitlines()
    assert "(version " in repaired.stdout
    [row] = [line for line in repaired.stdout.splitlines() if line.startswith("also held")]
    assert row.startswith(f"also held in its own row, released: d (token {in_row.stdout.strip()}")
    assert '"p"' in row  # its record: the owner
    assert cli(sqlite_url, namespace, "locks").stdout == "no locks held\n"


# --- run ----------------------------------------------------------------------------------------


def test_run_exits_with_the_command_status(sqlite_url: str, namespace: str) -> None:
    result = cli(sqlite_url, namespace, "run", "--lock", "x", "--", "sh", "-c", "exit 3")
    assert (result.returncode, result.stderr) == (3, "")
    assert held(sqlite_url, namespace) == []


def test_run_exits_128_plus_the_signal_that_killed_the_command(
    sqlite_url: str, namespace: str
) -> None:
    result = cli(sqlite_url, namespace, "run", "--lock", "x", "--", "sh", "-c", "kill -TERM $$")
    assert result.returncode == 128 + signal.SIGTERM
    assert held(sqlite_url, namespace) == []


def test_run_holds_the_locks_for_the_command_while_it_runs(db_url: str, namespace: str) -> None:
    result = cli(
        db_url,
        namespace,
        "run",
        "--lock",
        "x",
        "--lock",
        "y",
        "--note",
        "inner",
        "--",
        PY,
        "-c",
        LOOK_FROM_INSIDE,
        db_url,
        namespace,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    pid = seen["pid"]
    assert [(lock["name"], lock["pid"], lock["state"]) for lock in seen["locks"]] == [
        ("x", pid, "alive"),
        ("y", pid, "alive"),
    ]
    assert {lock["owner"] for lock in seen["locks"]} == {f"run:{HOST}:{pid}"}
    assert {lock["note"] for lock in seen["locks"]} == {"inner"}
    assert seen["probe"] == 75 and f"pid {pid} on {HOST}" in seen["probe_err"]
    assert held(db_url, namespace) == []


def test_run_with_an_owner_names_the_entries_after_it(sqlite_url: str, namespace: str) -> None:
    result = cli(
        sqlite_url,
        namespace,
        "run",
        "--owner",
        "job:7",
        "--lock",
        "x",
        "--",
        PY,
        "-c",
        LOOK_FROM_INSIDE,
        sqlite_url,
        namespace,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert [(lock["owner"], lock["pid"]) for lock in seen["locks"]] == [("job:7", seen["pid"])]
    assert held(sqlite_url, namespace) == []


def test_two_runs_contend_and_the_second_waits_visibly(
    db_url: str, namespace: str, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    first = start(
        db_url, namespace, "run", "--lock", "x", "--", PY, "-c", HOLD_UNTIL_STOP, str(one)
    )
    second: subprocess.Popen[str] | None = None
    try:
        wait_until((one / "started").exists, "the first command to start")
        first_pid = int((one / "started").read_text())
        err = tmp_path / "second.stderr"
        second = start(
            db_url,
            namespace,
            "run",
            "--lock",
            "x",
            "--",
            PY,
            "-c",
            HOLD_UNTIL_STOP,
            str(two),
            stderr=err,
        )
        wait_until(lambda: "waiting for x" in err.read_text(), "the second run to wait")
        assert err.read_text().startswith(
            f"waiting for x, held by run:{HOST}:{first_pid} (pid {first_pid} on {HOST}) since "
        )
        assert not (two / "started").exists()
        assert second.poll() is None
        (two / "stop").touch()  # the second command may end as soon as it runs
        (one / "stop").touch()
        assert finish(first)[0] == 0
        assert finish(second)[0] == 0
        assert (one / "done").exists() and (two / "done").exists()
        assert (one / "done").stat().st_mtime_ns <= (two / "started").stat().st_mtime_ns
        assert err.read_text().count("waiting for") == 1
    finally:
        (one / "stop").touch()
        (two / "stop").touch()
        stop(first)
        stop(second)
    assert held(db_url, namespace) == []


def test_run_no_wait_on_a_held_lock_exits_75_without_running(
    db_url: str, namespace: str, tmp_path: Path
) -> None:
    assert cli(db_url, namespace, "acquire", "x", "--owner", "holder").returncode == 0
    marker = tmp_path / "ran"
    result = cli(db_url, namespace, "run", "--no-wait", "--lock", "x", "--", "touch", str(marker))
    assert result.returncode == 75
    assert "x is held by holder" in one_error_line(result)
    assert not marker.exists()
    assert [lock["owner"] for lock in held(db_url, namespace)] == ["holder"]


def test_run_timeout_exits_75_without_running(
    sqlite_url: str, namespace: str, tmp_path: Path
) -> None:
    assert cli(sqlite_url, namespace, "acquire", "x", "--owner", "holder").returncode == 0
    marker = tmp_path / "ran"
    result = cli(
        sqlite_url, namespace, "run", "--timeout", "0.3", "--lock", "x", "--", "touch", str(marker)
    )
    assert result.returncode == 75
    waiting, gave_up = result.stderr.splitlines()
    assert waiting.startswith("waiting for x, held by holder")
    assert gave_up.startswith("tasklocks: gave up after waiting 0.3s")
    assert not marker.exists()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_run_forwards_signals_to_the_command(
    sqlite_url: str, namespace: str, tmp_path: Path, signame: str
) -> None:
    def default_sigint() -> None:  # a background job may have inherited SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    run = start(
        sqlite_url,
        namespace,
        "run",
        "--lock",
        "x",
        "--",
        PY,
        "-c",
        TRAP_SIGNAL,
        str(tmp_path),
        signame,
        preexec_fn=default_sigint,
    )
    try:
        wait_until((tmp_path / "ready").exists, "the command to trap the signal")
        assert [lock["name"] for lock in held(sqlite_url, namespace)] == ["x"]
        run.send_signal(getattr(signal, signame))
        assert finish(run)[0] == 0
    finally:
        stop(run)
    assert (tmp_path / "got").read_text() == signame
    assert held(sqlite_url, namespace) == []


@pytest.mark.parametrize("command", ["acquire", "run"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_while_waiting_ends_the_wait_as_documented(
    sqlite_url: str, namespace: str, tmp_path: Path, command: str, signame: str
) -> None:
    """The exit-code table's 130 (SIGINT: the wait gives up its place in line at once), 143 and
    129 (SIGTERM and SIGHUP kill it: the shell's 128+N; its place goes once it is provably
    gone); the command never runs."""
    assert cli(sqlite_url, namespace, "acquire", "x", "--owner", "holder").returncode == 0
    err = tmp_path / "stderr"
    marker = tmp_path / "ran"
    args = {
        "acquire": ["acquire", "x", "--owner", "me", "--wait"],
        "run": ["run", "--lock", "x", "--", "touch", str(marker)],
    }[command]
    waiter = start(
        sqlite_url,
        namespace,
        *args,
        stderr=err,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_until(lambda: "waiting for x" in err.read_text(), "the wait to begin")
        waiter.send_signal(getattr(signal, signame))
        code = finish(waiter)[0]
    finally:
        stop(waiter)
    # Killed by signal N, -N here, is 128+N in a shell: 143 for SIGTERM, 129 for SIGHUP.
    assert code == {"SIGINT": 130, "SIGTERM": -signal.SIGTERM, "SIGHUP": -signal.SIGHUP}[signame]
    assert not marker.exists()
    waiters = json.loads(cli(sqlite_url, namespace, "waiting", "--json").stdout)
    assert [w["state"] for w in waiters] in ([], ["dead"])
    assert not (signame == "SIGINT" and waiters)
    assert [lock["owner"] for lock in held(sqlite_url, namespace)] == ["holder"]


def test_run_killed_with_sigkill_leaves_the_locks_to_the_command(
    db_url: str, namespace: str, tmp_path: Path
) -> None:
    run = start(
        db_url, namespace, "run", "--lock", "x", "--", PY, "-c", HOLD_UNTIL_STOP, str(tmp_path)
    )
    try:
        wait_until((tmp_path / "started").exists, "the command to start")
        pid = int((tmp_path / "started").read_text())
        run.kill()
        assert finish(run)[0] == -signal.SIGKILL

        locks = held(db_url, namespace)
        assert [(lock["name"], lock["pid"], lock["state"]) for lock in locks] == [
            ("x", pid, "alive")
        ]
        refused = cli(db_url, namespace, "acquire", "x", "--owner", "other")
        assert refused.returncode == 75
        assert f"pid {pid} on {HOST}" in refused.stderr
        assert cli(db_url, namespace, "reap").stdout == "nothing to reap\n"
        assert not process_ended(pid)
    finally:
        (tmp_path / "stop").touch()
        stop(run)
    wait_until(lambda: process_ended(pid), "the orphaned command to end")
    assert (tmp_path / "done").exists()
    assert [lock["state"] for lock in held(db_url, namespace)] == ["dead"]
    taken = cli(db_url, namespace, "acquire", "x", "--owner", "other")
    assert taken.returncode == 0, taken.stderr
    assert [lock["owner"] for lock in held(db_url, namespace)] == ["other"]


def test_a_huge_bad_value_is_not_echoed_whole(sqlite_url: str, namespace: str) -> None:
    result = cli(sqlite_url, namespace, "acquire", "x" * 10_000, "--owner", "me")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "bad lock name" in line and "10,000 characters" in line
    assert len(line) < 250


def test_a_killed_runs_keeper_keeps_the_locks_past_the_ttl(
    db_url: str, namespace: str, tmp_path: Path
) -> None:
    run = start(
        db_url,
        namespace,
        "--ttl",
        "1",
        "run",
        "--lock",
        "x",
        "--",
        PY,
        "-c",
        HOLD_UNTIL_STOP,
        str(tmp_path),
    )
    try:
        wait_until((tmp_path / "started").exists, "the command to start")
        pid = int((tmp_path / "started").read_text())
        run.kill()
        assert finish(run)[0] == -signal.SIGKILL
        time.sleep(3.0)  # three ttls: only the keeper can have renewed the command's session
        [lock] = held(db_url, namespace)
        assert (lock["pid"], lock["state"]) == (pid, "alive")
        assert 0 < lock["expires_in"] <= 4 / 3
        assert cli(db_url, namespace, "acquire", "x", "--owner", "other").returncode == 75
    finally:
        (tmp_path / "stop").touch()
        stop(run)
    wait_until(lambda: process_ended(pid), "the orphaned command to end")
    taken = cli(db_url, namespace, "acquire", "x", "--owner", "other")
    assert taken.returncode == 0, taken.stderr


def test_run_reports_a_command_it_cannot_run(
    sqlite_url: str, namespace: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-command"
    result = cli(sqlite_url, namespace, "run", "--lock", "x", "--", str(missing))
    assert result.returncode == 127
    assert one_error_line(result).startswith(f"tasklocks: cannot run {missing}: ")

    # An empty command is a missing one too (execvp('') raised ValueError: exit 75 in silence).
    for empty in ("", " "):
        result = cli(sqlite_url, namespace, "run", "--lock", "x", "--", empty)
        assert result.returncode == 127
        assert one_error_line(result) == (
            f"tasklocks: cannot run {empty!r}: No such file or directory"
        )

    not_executable = tmp_path / "script.sh"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    result = cli(sqlite_url, namespace, "run", "--lock", "x", "--", str(not_executable))
    assert result.returncode == 126
    assert "Permission denied" in one_error_line(result)
    assert held(sqlite_url, namespace) == []


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["run", "--lock", "x"], "needs a command"),
        (["run", "--lock", "x", "--"], "needs a command"),
        (["run", "--no-wait", "--timeout", "1", "--lock", "x", "--", "true"], "not both"),
        (["run", "--lock", "bad name", "--", "true"], "bad lock name"),
        (["run", "--owner", "bad owner", "--lock", "x", "--", "true"], "bad owner"),
    ],
)
def test_run_usage_errors_exit_2_with_one_line(
    sqlite_url: str, namespace: str, args: list[str], complaint: str
) -> None:
    result = cli(sqlite_url, namespace, *args)
    assert result.returncode == 2
    assert complaint in one_error_line(result)


@pytest.mark.parametrize(
    "args",
    [
        ["acquire", "x", "--owner", "me", "--note", "\udcff"],
        ["run", "--lock", "x", "--note", "a\udcffb", "--", "true"],
    ],
    ids=["acquire", "run"],
)
def test_a_note_that_is_not_utf8_is_a_usage_error(
    sqlite_url: str, namespace: str, args: list[str]
) -> None:
    """A byte that is not UTF-8 (Python's lone surrogate) is bad input, not an unexpected
    error: the option is named, nothing is taken."""
    result = cli(sqlite_url, namespace, *args)
    assert (result.returncode, result.stdout) == (2, "")
    line = one_error_line(result)
    assert line.startswith("tasklocks: argument --note: not UTF-8 text: "), line
    assert "give it in UTF-8" in line
    assert held(sqlite_url, namespace) == []


def test_run_without_a_lock_is_a_usage_error(sqlite_url: str, namespace: str) -> None:
    result = cli(sqlite_url, namespace, "run", "--", "true")
    assert result.returncode == 2
    assert one_error_line(result) == (
        "tasklocks: run needs a lock: --lock NAME, --shared NAME or --limit NAME=N"
    )


def test_a_run_killed_while_it_waits_leaves_no_keeper_behind(
    sqlite_url: str, namespace: str, tmp_path: Path
) -> None:
    assert cli(sqlite_url, namespace, "acquire", "x", "--owner", "other").returncode == 0
    run = start(sqlite_url, namespace, "run", "--lock", "x", "--", "true", stderr=tmp_path / "err")
    try:
        wait_until(lambda: "waiting for x" in (tmp_path / "err").read_text(), "run to wait")
        children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
        assert children, "run forks its command and a keeper"
        run.kill()
        assert finish(run)[0] == -signal.SIGKILL
        # The command gives up (its parent is gone), the keeper has nothing to keep.
        wait_until(lambda: all(process_ended(int(p)) for p in children), "run's children to end")
    finally:
        stop(run)


# --- queues, shared and counted locks -------------------------------------------------------------


def test_shared_and_counted_locks_show_their_mode(db_url: str, namespace: str) -> None:
    first = cli(
        db_url, namespace, "acquire", "a", "--shared", "db", "--limit", "slots=2", "--owner", "o1"
    )
    assert first.returncode == 0, first.stderr
    second = cli(
        db_url, namespace, "acquire", "--shared", "db", "--limit", "slots=2", "--owner", "o2"
    )
    assert second.returncode == 0, second.stderr
    modes = {
        (lock["name"], lock["owner"]): (lock["mode"], lock["limit"])
        for lock in held(db_url, namespace)
    }
    assert modes == {
        ("a", "o1"): ("exclusive", None),
        ("db", "o1"): ("shared", None),
        ("db", "o2"): ("shared", None),
        ("slots", "o1"): ("shared", 2),
        ("slots", "o2"): ("shared", 2),
    }
    table = cli(db_url, namespace, "locks").stdout.splitlines()
    assert [row.split()[6] for row in table[1:]] == [
        "exclusive",
        "shared",
        "shared",
        "limit",
        "limit",
    ]
    full = cli(db_url, namespace, "acquire", "--limit", "slots=2", "--owner", "o3")
    assert full.returncode == 75
    assert "slots is held by o1" in one_error_line(full) and "and 1 other" in full.stderr
    other = cli(db_url, namespace, "acquire", "--limit", "slots=3", "--owner", "o3")
    assert other.returncode == 2
    assert one_error_line(other) == (
        f"tasklocks: slots is taken with limit 2 by o1 (on {HOST}) since "
        f"{other.stderr.split(' since ')[1].split(',')[0]}, but this acquire asked for limit 3; "
        "use the same limit for every holder of slots"
    )


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--limit", "slots"], "expected NAME=N"),
        (["--limit", "slots=x"], "is not a whole number"),
        (["--limit", "slots=0"], "must be at least 1"),
    ],
)
def test_bad_limit_options_exit_2(
    sqlite_url: str, namespace: str, args: list[str], problem: str
) -> None:
    result = cli(sqlite_url, namespace, "acquire", *args, "--owner", "me")
    assert result.returncode == 2
    assert problem in result.stderr and "Traceback" not in result.stderr


def test_two_limits_for_one_name_exit_2(sqlite_url: str, namespace: str) -> None:
    result = cli(
        sqlite_url, namespace, "acquire", "--limit", "s=2", "--limit", "s=3", "--owner", "me"
    )
    assert result.returncode == 2
    assert one_error_line(result) == "tasklocks: --limit gives s two limits (2 and 3); give one"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["acquire", "a", "--shared", "a", "--owner", "me"], "--shared"),
        (["acquire", "--shared", "a", "a", "--owner", "me"], "--shared"),
        (["acquire", "a", "--limit", "a=2", "--owner", "me"], "--limit"),
        (["run", "--lock", "a", "--shared", "a", "--", "true"], "--shared"),
        (["run", "--lock", "a", "--limit", "a=2", "--", "true"], "--limit"),
    ],
)
def test_one_name_exclusive_and_shared_is_a_usage_error(
    sqlite_url: str, namespace: str, args: list[str], option: str
) -> None:
    """Not a lock taken shared in silence: the command asked for two things."""
    result = cli(sqlite_url, namespace, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert one_error_line(result) == (
        f"tasklocks: a is asked for both exclusively and with {option}; give one of the two"
    )
    assert held(sqlite_url, namespace) == []


# A note that would retitle the terminal, recolour it (ESC [ and C1's CSI) and delete (DEL).
RAW_NOTE = "a\x1b]0;pwned\x07b\x1b[31mred\x7f\x9b1m"
SHOWN_NOTE = "a\\x1b]0;pwned\\x07b\\x1b[31mred\\x7f\\x9b1m"


def assert_printable(text: str) -> None:
    """No control character (C0 but the newline, DEL, C1) reaches the terminal."""
    assert not [c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)], text


def test_control_characters_in_notes_are_shown_escaped_but_kept_in_json(
    sqlite_url: str, namespace: str, tmp_path: Path
) -> None:
    """locks, waiting, a refusal and a waiter's stderr line show a note's control characters
    as \\x1b; --json gives the note exactly as it was written."""
    taken = cli(sqlite_url, namespace, "acquire", "x", "--owner", "o1", "--note", RAW_NOTE)
    assert taken.returncode == 0, taken.stderr
    refused = cli(sqlite_url, namespace, "acquire", "x", "--owner", "o2")
    assert refused.returncode == 75
    assert_printable(refused.stderr)
    assert f", {SHOWN_NOTE};" in one_error_line(refused)
    err = tmp_path / "stderr"
    waiter = start(
        sqlite_url, namespace, "run", "--lock", "x", "--note", RAW_NOTE, "--", "true", stderr=err
    )
    try:
        wait_until(lambda: "waiting for x" in err.read_text(), "run to wait")
        assert_printable(err.read_text())
        assert SHOWN_NOTE in err.read_text()
        for command in ("locks", "waiting"):
            result = cli(sqlite_url, namespace, command)
            assert result.returncode == 0, result.stderr
            assert_printable(result.stdout)
            rows = [line for line in result.stdout.splitlines() if " o1 " in f" {line} "]
            rows += [line for line in result.stdout.splitlines() if "run:" in line]
            assert rows and all(row.endswith(SHOWN_NOTE) for row in rows), result.stdout
        assert [lock["note"] for lock in held(sqlite_url, namespace)] == [RAW_NOTE]
        waiting = json.loads(cli(sqlite_url, namespace, "waiting", "--json").stdout)
        assert [w["note"] for w in waiting] == [RAW_NOTE]
    finally:
        stop(waiter)


def test_waiters_are_listed_and_a_try_does_not_overtake_them(
    db_url: str, namespace: str, tmp_path: Path
) -> None:
    assert cli(db_url, namespace, "acquire", "x", "--owner", "first").returncode == 0
    err = tmp_path / "stderr"
    waiter = start(
        db_url, namespace, "acquire", "x", "y", "--owner", "second", "--wait", stderr=err
    )
    try:
        wait_until(lambda: "waiting for x" in err.read_text(), "the waiting line")
        assert err.read_text().startswith("waiting for x, held by first (on ")
        queue = json.loads(cli(db_url, namespace, "waiting", "--json").stdout)
        assert [(q["position"], q["owner"], [w["name"] for w in q["wants"]]) for q in queue] == [
            (1, "second", ["x", "y"])
        ]
        assert queue[0]["state"] == "alive" and queue[0]["pid"] == waiter.pid
        assert queue[0]["blocked_by"].startswith("x is held by first")
        text = cli(db_url, namespace, "locks").stdout
        assert "waiting (1, first come first served):" in text
        assert "second" in text.split("waiting (1")[1]
        late = cli(db_url, namespace, "acquire", "y", "--owner", "late")  # y is free, but queued
        assert late.returncode == 75
        assert "1 waiter is ahead in the queue: second" in one_error_line(late)
        assert cli(db_url, namespace, "release", "x", "--owner", "first").returncode == 0
        wait_until(lambda: waiter.poll() is not None, "the waiter to get x and y")
    finally:
        stop(waiter)
    assert waiter.returncode == 0
    assert cli(db_url, namespace, "waiting").stdout == "nobody waits\n"


def test_a_deadlock_exits_75_naming_the_cycle(
    sqlite_url: str, namespace: str, tmp_path: Path
) -> None:
    assert cli(sqlite_url, namespace, "acquire", "x", "--owner", "o1").returncode == 0
    assert cli(sqlite_url, namespace, "acquire", "y", "--owner", "o2").returncode == 0
    err = tmp_path / "stderr"
    waiter = start(sqlite_url, namespace, "acquire", "y", "--owner", "o1", "--wait", stderr=err)
    try:
        wait_until(lambda: "waiting for y" in err.read_text(), "o1 to wait for y")
        result = cli(sqlite_url, namespace, "acquire", "x", "--owner", "o2", "--wait")
        assert result.returncode == 75
        assert one_error_line(result).startswith(
            "tasklocks: deadlock: o2 holds y and waits for x; o1 holds x and waits for y; "
        )
        assert cli(sqlite_url, namespace, "release", "y", "--owner", "o2").returncode == 0
        wait_until(lambda: waiter.poll() is not None, "o1 to get y")
    finally:
        stop(waiter)
    assert waiter.returncode == 0


def test_run_takes_a_counted_lock(sqlite_url: str, namespace: str) -> None:
    result = cli(sqlite_url, namespace, "run", "--limit", "slots=2", "--", "true")
    assert result.returncode == 0, result.stderr
    assert held(sqlite_url, namespace) == []
