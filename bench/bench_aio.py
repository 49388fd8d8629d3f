"""Section 9: tasklocks.aio, an async pair against the blocking pair (and, on SQLite, against
``filelock.AsyncFileLock``), and the loop's lag while 50 coroutines queue on one name.

Everything runs in one event loop of this process, in interleaved blocks so that drift hits all
contenders alike; the blocking pair runs on the loop's thread (it blocks the loop, which is what
tasklocks.aio exists to avoid, but it is the cost to compare with).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import tasklocks
import tasklocks.aio

Timed = Callable[[], Awaitable[None]]


async def _pairs(contenders: dict[str, Timed], n: int, block: int = 50) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in contenders}
    for pair in contenders.values():  # warm up
        for _ in range(max(20, n // 20)):
            await pair()
    clock = time.perf_counter
    done = 0
    while done < n:
        step = min(block, n - done)
        for kind, pair in contenders.items():
            lat = out[kind]
            for _ in range(step):
                t0 = clock()
                await pair()
                lat.append(clock() - t0)
        done += step
    return out


async def _measure(
    url: str, namespace: str, n: int, lockfile: str | None
) -> dict[str, list[float]]:
    table = await tasklocks.aio.connect(url, namespace)
    blocking = tasklocks.connect(url, namespace)
    try:

        async def async_pair() -> None:
            lease = await table.acquire("aio-pair")
            await lease.release()

        async def blocking_pair() -> None:
            blocking.acquire("blocking-pair").release()

        contenders: dict[str, Timed] = {"async": async_pair, "blocking": blocking_pair}
        if lockfile is not None:
            import filelock

            lock = filelock.AsyncFileLock(lockfile)

            async def filelock_pair() -> None:
                await lock.acquire()
                await lock.release()

            contenders["filelock"] = filelock_pair
        return await _pairs(contenders, n)
    finally:
        blocking.close()
        await table.close()


def pairs(url: str, namespace: str, n: int, lockfile: str | None) -> dict[str, list[float]]:
    """Latencies of ``n`` pairs: "async", "blocking" and (with ``lockfile``) "filelock"."""
    return asyncio.run(_measure(url, namespace, n, lockfile))


async def _lag(url: str, namespace: str, waiters: int, hold: float) -> tuple[list[float], float]:
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        due = loop.time()
        while not stop.is_set():
            due += 0.005
            await asyncio.sleep(max(0.0, due - loop.time()))
            lags.append(loop.time() - due)
            due = max(due, loop.time())

    async with await tasklocks.aio.connect(url, namespace) as table:

        async def one() -> None:
            async with table.hold("lag", timeout=120):
                await asyncio.sleep(0)

        first = await table.acquire("lag")
        tick = asyncio.create_task(ticker())
        tasks = [asyncio.create_task(one()) for _ in range(waiters)]
        while len(await table.waiting()) < waiters:
            await asyncio.sleep(0.01)
        await asyncio.sleep(hold)
        start = time.monotonic()
        await first.release()
        await asyncio.gather(*tasks)
        took = time.monotonic() - start
        stop.set()
        await tick
    return lags, took


def loop_lag(url: str, namespace: str, waiters: int, hold: float) -> tuple[list[float], float]:
    """The lateness of a 5 ms ticker while ``waiters`` coroutines queue on one name (``hold``
    seconds) and then take it in turn; and how long the turns took."""
    return asyncio.run(_lag(url, namespace, waiters, hold))


def idle_cpu(url: str, namespace: str, waiters: int, seconds: float) -> float:
    """The share of a core this process spends while ``waiters`` coroutines wait."""

    async def main() -> float:
        holder = tasklocks.connect(url, namespace)
        lease = holder.acquire("idle")
        try:
            async with await tasklocks.aio.connect(url, namespace) as table:
                tasks = [
                    asyncio.create_task(table.acquire("idle", wait=True)) for _ in range(waiters)
                ]
                while len(await table.waiting()) < waiters:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(1.0)
                cpu, wall = time.process_time(), time.monotonic()
                await asyncio.sleep(seconds)
                share = (time.process_time() - cpu) / (time.monotonic() - wall)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            return share
        finally:
            lease.release()
            holder.close()

    return asyncio.run(main())


def lockfile(tmpdir: str) -> str:
    return os.path.join(tmpdir, "asyncfilelock.lock")
