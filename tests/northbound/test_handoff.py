"""ValueHandoff: latest value wins per tag, superseded values counted, wake-ups across threads."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from edgeos.northbound.handoff import ValueHandoff


def put(h: ValueHandoff, values: dict[int, float], quality: int = 0, ts: float = 1.0) -> None:
    idx = np.array(list(values), dtype=np.int32)
    h.put(
        idx,
        np.array(list(values.values()), dtype=np.float64),
        np.full(len(idx), quality, np.uint8),
        np.full(len(idx), ts, np.float64),
    )


def test_take_returns_the_latest_value_of_each_tag_and_counts_the_superseded_ones() -> None:
    h = ValueHandoff(4)
    put(h, {0: 1.0, 2: 5.0}, ts=10.0)
    put(h, {0: 2.0}, quality=17, ts=11.0)
    put(h, {0: 3.0, 3: 7.0}, ts=12.0)
    batch = h.take()
    assert batch.indices.tolist() == [0, 2, 3]
    assert batch.values.tolist() == [3.0, 5.0, 7.0]
    assert batch.source_ts.tolist() == [12.0, 10.0, 12.0]
    assert (h.offered, h.superseded, h.taken) == (5, 2, 3)
    assert h.take().indices.tolist() == []  # taken slots are forgotten


def test_pending_slots_are_bounded_by_the_tag_count_however_far_the_consumer_lags() -> None:
    h = ValueHandoff(3)
    for k in range(1000):
        put(h, {0: float(k), 1: float(k), 2: float(k)})
    assert h.pending == 3
    assert h.superseded == 2997
    assert h.take().values.tolist() == [999.0, 999.0, 999.0]


def test_texts_and_guard_state_travel_with_the_batch() -> None:
    h = ValueHandoff(2)
    h.put(
        np.array([1], np.int32),
        np.array([np.nan]),
        np.zeros(1, np.uint8),
        np.ones(1),
        texts={1: "recipe-7"},
        guard={"learning": True},
    )
    batch = h.take()
    assert batch.texts == {1: "recipe-7"} and batch.guard == {"learning": True}
    assert h.take().guard is None


async def test_a_put_wakes_a_consumer_loop_on_another_thread_once_per_take() -> None:
    h = ValueHandoff(2)
    wakes: list[int] = []
    taken: asyncio.Queue[list[float]] = asyncio.Queue()
    caller = asyncio.get_running_loop()
    ready = threading.Event()
    stop = threading.Event()

    def consumer() -> None:
        async def main() -> None:
            wake = asyncio.Event()
            loop = asyncio.get_running_loop()

            def waker() -> None:
                wakes.append(threading.get_ident())
                loop.call_soon_threadsafe(wake.set)

            h.set_waker(waker)
            ready.set()
            while not stop.is_set():
                await wake.wait()
                wake.clear()
                caller.call_soon_threadsafe(taken.put_nowait, h.take().values.tolist())
            h.set_waker(None)

        asyncio.run(main())

    thread = threading.Thread(target=consumer, name="handoff-consumer")
    thread.start()
    try:
        await asyncio.to_thread(ready.wait)
        put(h, {0: 1.0})
        put(h, {1: 2.0})  # before the take: no second wake-up, same batch or the next
        got = await taken.get()
        while len(got) < 2:
            got += await taken.get()
        assert sorted(got) == [1.0, 2.0]
        assert set(wakes) == {threading.get_ident()}  # the producer's thread calls the waker
    finally:
        stop.set()
        put(h, {0: 3.0})  # wakes the consumer so it sees the stop
        await asyncio.to_thread(thread.join)
