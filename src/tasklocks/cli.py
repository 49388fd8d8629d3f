"""The ``tasklocks`` command line: a thin layer over the public API.

Usage::

    tasklocks [--db URL] [--namespace NS] COMMAND ...

    locks [--json]                          every held lock and the queue of waiters
    waiting [--json]                        the queue of waiters alone
    acquire NAME... --owner OWNER [--shared NAME]... [--limit NAME=N]... [--wait] [--timeout S]
    release NAME... --owner OWNER | release --owner OWNER | release --all --yes
    reap                                    release the locks of provably dead holders
    repair --yes                            print a namespace's raw document, then reset it
    run [--lock NAME]... [--shared NAME]... [--limit NAME=N]... [--no-wait] [--timeout S]
        [--note TEXT] [--owner OWNER] -- CMD [ARG...]
    serve [--host H] [--port P] [--token T] the web dashboard (needs tasklocks[web])

Exit codes:

    0   ok (``run``: the command's own status, 128+N if a signal N killed it)
    75  a lock is held (without waiting), waiting timed out, or it would deadlock
    2   usage error or bad input (bad lock name, bad URL, missing --yes)
    69  database unavailable (``serve``: also the web extra not installed)
    1   anything else (a lock not held by that owner, a corrupt lock table)
    130 interrupted by SIGINT (Ctrl-C) while waiting or working (a wait gives up)
    143 killed by SIGTERM (129: SIGHUP, 131: SIGQUIT) while waiting or working, as a shell
        shows it; ``run`` passes these signals on to its command once it runs
    127 ``run``: no such command (126: the command cannot be executed)

Every error is one line on stderr starting with ``tasklocks: ``.

``run`` is crash-safe: the locks are taken for the command's process itself (its pid and start
token), not for ``run``. ``run`` forks a child that waits on a pipe, takes the locks in the child's
name, then lets it ``exec`` the command; so if ``run`` is killed with SIGKILL the command keeps its
locks until it ends too, and then anyone can reclaim them as the locks of a dead process.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

from tasklocks import (
    HeldLock,
    LeaseLost,
    LockHeld,
    LockTable,
    NotHeld,
    QueuedWaiter,
    TasklocksError,
    WaitStatus,
    connect,
    names,
    process_identity,
)
from tasklocks._cli_args import add_mode_options, lock_spec, print_table, printable, utf8_text
from tasklocks._cli_tasks import add_task_commands
from tasklocks._keeper import GRACE, fork_keeper
from tasklocks._session import DEFAULT_TTL, MAX_TTL, MIN_TTL
from tasklocks.errors import (
    EXIT_FAILURE,
    EXIT_LOCKED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    clock,
    describe_holder,
    describe_way,
    ordinal,
    quote,
)
from tasklocks.store import DEFAULT_TABLE, default_url

__all__ = ["build_parser", "main"]

PROG = "tasklocks"
EXIT_OK = 0
EXIT_INTERRUPTED = 130  # 128 + SIGINT

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK:<3} ok (run: the command's own exit status, 128+N if signal N killed it;
      wait: 0 the task succeeded, 1 it failed, 75 it was stopped, timed out or crashed)
  {EXIT_LOCKED:<3} a lock is held (without --wait, or run --no-wait), waiting timed out,
      or waiting would deadlock
  {EXIT_USAGE:<3} usage error or bad input (bad lock name, bad URL, missing --yes)
  {EXIT_UNAVAILABLE:<3} database unavailable (serve: also the web extra not installed)
  {EXIT_FAILURE:<3} anything else (e.g. a lock not held by that owner, a corrupt lock table)
  {EXIT_INTERRUPTED:<3} interrupted by SIGINT (Ctrl-C) while waiting or working: a wait gives
      up its place in line (run passes signals on to its command once it runs)
  143 killed by SIGTERM (129: SIGHUP, 131: SIGQUIT) while waiting or working, as the
      shell shows it (128+N); its place in line goes once it is provably gone
  127 run: no such command (126: the command cannot be executed)
errors are one line on stderr starting with "{PROG}: ".
"""

# Signals `run` passes on to the command instead of dying from them.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

# The one byte `run` sends its waiting child: exec the command, or give up.
_GO = b"g"
_NO = b"n"


class UsageError(Exception):
    """Bad command-line input found after argparse accepted it (exit 2, one line)."""


# --- formatting ---------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(message: str) -> None:
    print(f"{PROG}: {printable(_one_line(message))}", file=sys.stderr, flush=True)


class _Waiting:
    """The ``watch`` callback: say on stderr who we are waiting for when the wait begins, and
    again whenever that or our place in line changes."""

    def __init__(self) -> None:
        self.said = ""

    def __call__(self, status: WaitStatus) -> None:
        parts = [
            f"{name}, held by {describe_holder(hs[0])}"
            + (f" and {len(hs) - 1} more" if len(hs) > 1 else "")
            for name, hs in sorted(status.holders.items())
            if hs
        ]
        text = "; ".join(parts) if parts else ", ".join(status.names)
        if status.ahead:
            first = describe_holder(status.ahead[0])
            more = f" and {len(status.ahead) - 1} more" if len(status.ahead) > 1 else ""
            text += f"; {ordinal(status.position)} in line, after {first}{more}"
        line = printable(f"waiting for {text}")
        if line != self.said:
            self.said = line
            print(line, file=sys.stderr, flush=True)


def _seconds(text: str) -> float:
    """argparse type for --timeout: a finite number of seconds, zero or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {quote(text)}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more seconds: {quote(text)}")
    return value


def _ttl(text: str) -> float:
    """argparse type for --ttl: a second to a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {quote(text)}") from None
    if not MIN_TTL <= value <= MAX_TTL:  # (NaN too)
        raise argparse.ArgumentTypeError(
            f"must be {MIN_TTL:g} to {MAX_TTL:g} seconds: {quote(text)}"
        )
    return value


def _with_hint(exc: LockHeld, owner: str, hint: str) -> LockHeld:
    """The same refusal with a hint in command-line terms (unless it is our own lock)."""
    if exc.held and all(h.owner == owner for h in exc.held.values()):
        return exc  # not re-entrant: the library's message already says so
    return LockHeld(exc.held, hint=hint, holders=exc.holders, queue=exc.queue)


# --- commands -----------------------------------------------------------------------------------


def _open(args: argparse.Namespace) -> LockTable:
    return connect(args.db, args.namespace, ttl=args.ttl)


def _iso(epoch: float) -> str:
    since = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return since.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _mode(shared: bool, limit: int | None) -> str:
    if limit is not None:
        return f"limit {limit}"
    return "shared" if shared else "exclusive"


def _lock_record(lock: HeldLock) -> dict[str, Any]:
    holder = lock.holder
    return {
        "name": lock.name,
        "owner": holder.owner,
        "pid": holder.pid,
        "host": holder.host,
        "since": _iso(holder.since),
        "since_epoch": holder.since,
        "token": holder.token,
        "mode": "shared" if lock.shared else "exclusive",
        "limit": lock.limit,
        "state": lock.liveness.value,
        "expires_in": None if lock.expires_in is None else round(lock.expires_in, 3),
        "note": holder.note,
    }


def _waiter_record(q: QueuedWaiter) -> dict[str, Any]:
    w = q.waiter
    return {
        "position": q.position,
        "owner": w.owner,
        "wants": [
            {"name": x.name, "mode": "shared" if x.shared else "exclusive", "limit": x.limit}
            for x in w.wants
        ],
        "pid": w.pid,
        "host": w.host,
        "since": _iso(w.since),
        "since_epoch": w.since,
        "state": q.liveness.value,
        "expires_in": None if q.expires_in is None else round(q.expires_in, 3),
        "note": w.note,
        "blocked_by": describe_way(q.holders, q.ahead),
    }


def _expires(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}s"


def _print_held(held: list[HeldLock]) -> None:
    header = ("NAME", "OWNER", "PID", "HOST", "SINCE", "TOKEN", "MODE", "STATE", "EXPIRES", "NOTE")
    print_table(
        [header]
        + [
            (
                h.name,
                h.holder.owner,
                "-" if h.holder.pid is None else str(h.holder.pid),
                h.holder.host,
                clock(h.holder.since),
                str(h.holder.token),
                _mode(h.shared, h.limit),
                h.liveness.value,
                _expires(h.expires_in),
                _one_line(h.holder.note or ""),
            )
            for h in held
        ]
    )


def _print_queue(queue: list[QueuedWaiter]) -> None:
    header = ("POS", "OWNER", "WANTS", "PID", "HOST", "SINCE", "STATE", "EXPIRES", "NOTE")
    print_table(
        [header]
        + [
            (
                str(q.position),
                q.owner,
                ", ".join(x.describe() for x in q.wants),
                "-" if q.waiter.pid is None else str(q.waiter.pid),
                q.waiter.host,
                clock(q.since),
                q.liveness.value,
                _expires(q.expires_in),
                _one_line(q.waiter.note or ""),
            )
            for q in queue
        ]
    )


def cmd_locks(args: argparse.Namespace) -> int:
    with _open(args) as table:
        held = table.held()
        queue = table.waiting()
    if args.json:
        print(json.dumps([_lock_record(h) for h in held], indent=2))
        return EXIT_OK
    if not held:
        print("no locks held")
    else:
        _print_held(held)
    if queue:
        print()
        print(f"waiting ({len(queue)}, first come first served):")
        _print_queue(queue)
    return EXIT_OK


def cmd_waiting(args: argparse.Namespace) -> int:
    with _open(args) as table:
        queue = table.waiting()
    if args.json:
        print(json.dumps([_waiter_record(q) for q in queue], indent=2))
    elif not queue:
        print("nobody waits")
    else:
        _print_queue(queue)
    return EXIT_OK


def cmd_acquire(args: argparse.Namespace) -> int:
    wait = args.wait or args.timeout is not None
    spec = lock_spec(args.names, args.shared, args.limits)
    if not spec.names:
        raise UsageError("acquire needs a lock: NAME, --shared NAME or --limit NAME=N")
    if sys.stdout is None:  # (>&-: print() would drop the token in silence)
        raise UsageError("standard output is closed, and acquire prints the token there")
    with _open(args) as table:
        try:
            lease = table.acquire(
                *spec.names,
                owner=args.owner,
                wait=wait,
                timeout=args.timeout,
                note=args.note,
                watch=_Waiting(),
                process=None,  # this process ends at once: the entries belong to OWNER only
                **spec.kwargs(),
            )
        except LockHeld as exc:
            raise _with_hint(exc, args.owner, "add --wait to wait for it") from None
        try:
            print(lease.token, flush=True)
        except OSError as exc:  # (| true): nobody learns the token, so nobody would release
            lease.release()
            raise TasklocksError(
                f"could not print the token ({exc.strerror or exc}), so "
                f"{', '.join(lease.names)} {'was' if len(lease.names) == 1 else 'were'} "
                "released again"
            ) from None
    return EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    if args.all:
        if args.names or args.owner is not None:
            raise UsageError("release --all takes no lock names and no --owner")
        if not args.yes:
            raise UsageError(
                f"release --all releases every lock in namespace {args.namespace!r}, "
                "whoever holds it; add --yes to do it"
            )
        with _open(args) as table:
            freed = table.release_all()
    elif args.owner is None:
        raise UsageError("release needs --owner OWNER (the owner given to acquire), or --all --yes")
    elif args.names:
        with _open(args) as table:
            table.release(*args.names, owner=args.owner)
        freed = list(dict.fromkeys(args.names))
    else:
        with _open(args) as table:
            freed = table.release_owner(args.owner)
    for name in freed:
        print(name)
    return EXIT_OK


def cmd_reap(args: argparse.Namespace) -> int:
    with _open(args) as table:
        reaped = table.reap()
    if not reaped:
        print("nothing to reap")
    for name, holder in sorted(reaped, key=lambda r: r[0]):
        print(printable(f"reaped {name} from {describe_holder(holder)}"))
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    if not args.yes:
        raise UsageError(
            f"repair resets the lock document of namespace {args.namespace!r} to empty, "
            "dropping every lock in it; add --yes to do it"
        )
    with _open(args) as table:
        old = table.repair()
    print(f"old document of namespace {args.namespace} (version {old.version}):")
    print(old.data)
    for name, token, lease, record in old.unshown:  # (the document could not show them)
        print(
            f"also held in its own row, released: {name} (token {token}, lease {lease}): {record}"
        )
    print(f"namespace {args.namespace} reset to an empty lock document")
    return EXIT_OK


# --- run ----------------------------------------------------------------------------------------


def _child(read_fd: int, command: list[str]) -> None:
    """The forked child: wait for the parent's word, then exec the command. Never returns.

    It touches nothing the parent owns (no database connection exists yet when it is forked)
    and leaves only through ``os._exit`` or ``exec``.
    """
    code = EXIT_LOCKED
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        word = os.read(read_fd, 1)
        if word != _GO:  # b"" (the parent died) or _NO (it did not get the locks)
            os._exit(EXIT_LOCKED)
        os.close(read_fd)
        # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across exec, so
        # restore the defaults a command expects (as subprocess does with restore_signals).
        for name in ("SIGPIPE", "SIGXFSZ"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        try:
            if not command[0]:  # (execvp raises ValueError, not the kernel's ENOENT)
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            os.execvp(command[0], command)
        except OSError as exc:
            code = 126 if isinstance(exc, PermissionError) else 127
            reason = exc.strerror or str(exc)
            shown = printable(_one_line(command[0])) if command[0].strip() else repr(command[0])
            message = f"{PROG}: cannot run {shown}: {reason}\n"
            os.write(2, message.encode(errors="replace"))
    except BaseException:
        pass
    finally:
        os._exit(code)


class _Child:
    """The forked child as the parent sees it: tell it go or no, then wait for it (once)."""

    def __init__(self, pid: int, write_fd: int) -> None:
        self.pid = pid
        self.write_fd = write_fd
        self.status: int | None = None

    def _send(self, word: bytes) -> None:
        if self.write_fd < 0:
            return
        try:
            os.write(self.write_fd, word)
        except BrokenPipeError:
            pass  # the child is gone already; wait() collects its status
        finally:
            os.close(self.write_fd)
            self.write_fd = -1

    def go(self) -> None:
        """Let the child exec the command."""
        self._send(_GO)

    def wait(self) -> int:
        """Wait for the child (telling it "no" if it never got "go"); return its exit status,
        or 128+N if signal N killed it."""
        if self.status is None:
            self._send(_NO)
            while True:
                try:
                    _, status = os.waitpid(self.pid, 0)
                except InterruptedError:
                    continue
                break
            code = os.waitstatus_to_exitcode(status)
            self.status = 128 - code if code < 0 else code
        return self.status


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run needs a command: tasklocks run --lock NAME -- CMD [ARG...]")
    if args.no_wait and args.timeout is not None:
        raise UsageError("run takes --no-wait or --timeout, not both")
    spec = lock_spec(args.locks, args.shared, args.limits)
    if not spec.names:
        raise UsageError("run needs a lock: --lock NAME, --shared NAME or --limit NAME=N")
    if args.owner is not None:
        names.validate_owner(args.owner)

    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits; tests see it from outside
        os.close(write_fd)
        _child(read_fd, command)
    os.close(read_fd)

    # A keeper renews the command's locks if this process is killed while the command runs
    # (forked now, before this process has threads or connections).
    keeper = fork_keeper(default_url() if args.db is None else args.db, DEFAULT_TABLE, pid=pid)

    # From here on the parent alone opens the database.
    child = _Child(pid, write_fd)
    try:
        identity = process_identity(pid)
        owner = args.owner or f"run:{identity.host}:{pid}"
        with _open(args) as table:
            try:
                lease = table.acquire(
                    *spec.names,
                    owner=owner,
                    wait=not args.no_wait,
                    timeout=args.timeout,
                    note=args.note,
                    watch=_Waiting(),
                    process=identity,  # the entries name the command's process, not this one
                    **spec.kwargs(),
                )
            except LockHeld as exc:
                raise _with_hint(exc, owner, "drop --no-wait to wait for it") from None
            stop_child = lambda: _stop_child(pid)  # noqa: E731
            if lease.session is not None:
                keeper.keep(lease.session)
                lease.session.on_lost.append(stop_child)
            try:
                previous = _forward_signals(pid)
                try:
                    child.go()
                    code = child.wait()
                finally:
                    _restore_signals(previous)
            finally:
                child.wait()  # never release while the command may still run
                if lease.session is not None:  # its pid may be another process's from now on
                    lease.session.on_lost.remove(stop_child)
                _release(lease.release, " ".join(lease.names))
            lease.check()  # lost while the command ran: it was stopped; say so (exit 75)
            return code
    finally:
        child.wait()  # it did not get the locks: it exits 75 without running the command
        keeper.dismiss()


def _stop_child(pid: int) -> None:
    """The command's locks are lost (their session expired): stop it, SIGKILL after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    timer = threading.Timer(GRACE, lambda: _kill_quietly(pid))
    timer.daemon = True
    timer.start()


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _release(release: Callable[[], None], what: str) -> None:
    try:
        release()
    except (NotHeld, LeaseLost):
        pass  # the command has ended and someone reclaimed its locks already
    except TasklocksError as exc:
        _error(f"could not release {what} ({exc}); the command has ended, so they are reclaimable")


_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _in_terminal_foreground(pid: int) -> bool:
    """Whether ``pid`` belongs to the terminal's foreground process group: then a Ctrl-C or
    Ctrl-\\ at the terminal reached it directly, and forwarding would deliver it twice."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal
    try:
        return os.tcgetpgrp(fd) == os.getpgid(pid)
    except OSError:
        return False
    finally:
        os.close(fd)


def _forward_signals(pid: int) -> dict[int, _Handler]:
    def forward(signum: int, frame: FrameType | None) -> None:
        if signum in (signal.SIGINT, signal.SIGQUIT) and _in_terminal_foreground(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous: dict[int, _Handler] = {}
    for signum in FORWARDED_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue  # ignored here (nohup, a background job): the command ignores it too
        previous[signum] = signal.signal(signum, forward)
    return previous


def _restore_signals(previous: dict[int, _Handler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


# --- parser -------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line, as every error of this command line (its
    subcommands' parsers are of the same class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: {printable(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tasklocks`` (every subcommand's ``func`` is set)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Crash-safe locks between processes, kept in a database: a row per namespace "
        "and a row per lock name.",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        default=None,
        help="sqlite:///path.db, mysql://user:pass@host:port/db or postgresql://user@host:port/db "
        "(postgresql://user@/db: libpq's default host, $PGHOST or its Unix socket) "
        "(default: $TASKLOCKS_DB, else $XDG_STATE_HOME/tasklocks/tasklocks.db)",
    )
    parser.add_argument(
        "--namespace", metavar="NS", default="default", help="lock namespace (default: default)"
    )
    parser.add_argument(
        "--ttl",
        metavar="S",
        type=_ttl,
        default=DEFAULT_TTL,
        help=f"seconds locks outlive their last renewal at least (at most ttl + ttl/3), if "
        f"this process can no longer renew them ({MIN_TTL:g} to {MAX_TTL:g}; default: "
        f"{DEFAULT_TTL:g})",
    )
    commands = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], **kw: Any) -> Any:
        sub = commands.add_parser(name, epilog=EXIT_CODES_HELP, formatter_class=formatter, **kw)
        sub.set_defaults(func=func)
        return sub

    p = add("locks", cmd_locks, help="list every held lock, and the queue of waiters")
    p.add_argument("--json", action="store_true", help="print a JSON array of the held locks")

    p = add("waiting", cmd_waiting, help="list the queue of waiters, first come first served")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    owner_help = (
        "who holds the locks (required: this command ends at once, so its entries carry no "
        "pid and are never reclaimed by pid; release them with the same --owner)"
    )
    p = add(
        "acquire",
        cmd_acquire,
        help="take locks for an explicit owner; print the fencing token",
        description="Take every NAME, or none, for OWNER, and print the fencing token.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="a lock to take exclusively")
    add_mode_options(p)
    p.add_argument("--owner", required=True, help=owner_help)
    p.add_argument(
        "--wait",
        action="store_true",
        help="queue up until the locks are free (first come first served)",
    )
    p.add_argument(
        "--timeout", type=_seconds, metavar="S", help="give up waiting after S seconds (waits)"
    )
    p.add_argument("--note", metavar="TEXT", type=utf8_text, help="shown to those who wait")

    p = add(
        "release",
        cmd_release,
        help="release locks",
        description="release NAME... --owner OWNER releases those locks; release --owner OWNER "
        "releases all of that owner's locks; release --all --yes releases every lock. "
        "Prints the names released.",
    )
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--owner", help="the owner the locks were acquired for")
    p.add_argument("--all", action="store_true", help="release every lock (needs --yes)")
    p.add_argument("--yes", action="store_true", help="confirm --all")

    add("reap", cmd_reap, help="release the locks of provably dead holders")

    p = add(
        "repair",
        cmd_repair,
        help="print a namespace's raw document, then reset it to empty",
        description="Print the raw lock document and its version, then reset it to empty "
        "(for a corrupt lock table). Every lock in the namespace is dropped.",
    )
    p.add_argument("--yes", action="store_true", help="confirm the reset")

    p = add(
        "run",
        cmd_run,
        help="run a command while holding locks (like flock(1), crash-safe)",
        usage=f"{PROG} run [--lock NAME]... [--shared NAME]... [--limit NAME=N]... [--no-wait] "
        "[--timeout S] [--note TEXT] [--owner OWNER] -- CMD [ARG...]",
        description="Take the locks for the command's own process, run it without a shell, "
        "forward SIGINT, SIGTERM, SIGHUP and SIGQUIT to it, release the locks when it ends "
        "and exit with its status (128+N if signal N killed it). If run itself is killed, "
        "the command keeps the locks until it ends too; then they are reclaimable.",
    )
    p.add_argument(
        "--lock",
        dest="locks",
        action="append",
        default=[],
        metavar="NAME",
        help="a lock to hold exclusively (repeat for several; all are taken at once)",
    )
    add_mode_options(p)
    p.add_argument("--no-wait", action="store_true", help="exit 75 at once if a lock is held")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="give up waiting after S seconds")
    p.add_argument("--note", metavar="TEXT", type=utf8_text, help="shown to those who wait")
    p.add_argument("--owner", help="owner id (default: run:<host>:<pid of the command>)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")

    add_task_commands(add)

    p = add(
        "serve",
        cmd_serve,
        help="serve the dashboard (tasks, locks, timeline) in a browser; needs tasklocks[web]",
        description="Serve a web dashboard over the same database: tasks with their progress, "
        "held locks, and a timeline of waits and runs. It binds 127.0.0.1 unless --host says "
        "otherwise; another address needs --token (or $TASKLOCKS_TOKEN), then required on every "
        "request (open http://HOST:PORT/?token=TOKEN once). Needs the web extra: "
        "pip install 'tasklocks[web]' (without it: exit 69).",
    )
    # Also after the command: `tasklocks serve --db URL` (SUPPRESS keeps the global value).
    p.add_argument("--db", metavar="URL", default=argparse.SUPPRESS, help="as the global --db")
    p.add_argument(
        "--namespace", metavar="NS", default=argparse.SUPPRESS, help="as the global --namespace"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument(
        "--token",
        default=None,
        help="required on every request (default: $TASKLOCKS_TOKEN); needed off loopback",
    )
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from tasklocks.web import serve, token_from_env  # imports no web framework until it serves

    return serve(
        args.db,
        args.namespace,
        host=args.host,
        port=args.port,
        token=token_from_env(args.token),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except TasklocksError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (| head): nothing more to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:  # never a traceback: one line, then exit 1
        _error(f"unexpected error: {type(exc).__name__}: {exc}")
        return EXIT_FAILURE
