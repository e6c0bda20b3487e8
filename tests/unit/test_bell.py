"""The bell that threads ring and the server's coroutines wait on."""

from __future__ import annotations

import asyncio
import threading

from corral.bell import Bell


def test_a_ring_from_another_thread_wakes_the_waiter() -> None:
    bell = Bell()

    async def main() -> bool:
        bell.bind(asyncio.get_running_loop())
        since = bell.rings
        threading.Timer(0.05, bell.ring).start()
        return await bell.wait(since, timeout=30)

    assert asyncio.run(asyncio.wait_for(main(), 20)) is True
    assert bell.rings == 1


def test_a_ring_between_the_look_and_the_wait_is_not_lost() -> None:
    bell = Bell()

    async def main() -> bool:
        since = bell.rings
        bell.ring()  # before the waiter waits, and before anything is bound
        return await bell.wait(since, timeout=30)

    assert asyncio.run(asyncio.wait_for(main(), 20)) is True


def test_without_a_ring_the_wait_ends_at_its_timeout() -> None:
    bell = Bell()

    async def main() -> bool:
        return await bell.wait(bell.rings, timeout=0.05)

    assert asyncio.run(main()) is False


def test_rings_faster_than_the_loop_wake_every_waiter_once() -> None:
    bell = Bell()
    woken: list[int] = []

    async def waiter(i: int, since: int) -> None:
        if await bell.wait(since, timeout=30):
            woken.append(i)

    async def main() -> None:
        bell.bind(asyncio.get_running_loop())
        since = bell.rings
        waiters = [asyncio.create_task(waiter(i, since)) for i in range(5)]
        await asyncio.sleep(0)  # all waiting
        ringers = [threading.Thread(target=bell.ring) for _ in range(50)]
        for t in ringers:
            t.start()
        for t in ringers:
            t.join()
        await asyncio.gather(*waiters)

    asyncio.run(asyncio.wait_for(main(), 20))
    assert sorted(woken) == [0, 1, 2, 3, 4]
    assert bell.rings == 50


def test_a_bell_bound_to_a_closed_loop_rebinds_to_the_running_one() -> None:
    bell = Bell()
    loop = asyncio.new_event_loop()
    bell.bind(loop)
    loop.close()
    bell.ring()  # the closed loop cannot be woken: no error

    async def main() -> bool:
        since = bell.rings
        threading.Timer(0.05, bell.ring).start()
        return await bell.wait(since, timeout=30)

    assert asyncio.run(asyncio.wait_for(main(), 20)) is True
