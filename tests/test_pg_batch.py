"""The batching of concurrent lookups (registry/meta/pg_batch.py), with a plain async
function standing in for the statement: who goes at once, who waits and joins a
batch, what errors and cancellations do. The PostgreSQL store's own lookups are
checked against a real server in test_meta_contract.py."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from registry.meta.pg_batch import Batcher


class Recorder:
    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.fail_on = fail_on
        self.gate = asyncio.Event()
        self.gate.set()

    async def run(self, keys: list[str]) -> list[Any]:
        self.batches.append(list(keys))
        await self.gate.wait()
        await asyncio.sleep(0.01)
        if self.fail_on in keys:
            raise RuntimeError("the statement failed")
        # Two rows for keys starting with "2", none for "none", one otherwise.
        rows = []
        for i, k in enumerate(keys, 1):
            rows += [(i, k, n) for n in range(2 if k.startswith("2") else 0 if k == "none" else 1)]
        return rows


async def test_a_lone_lookup_goes_at_once_and_the_rest_join_one_batch():
    rec = Recorder()
    b = Batcher(rec.run, max_inflight=1)
    keys = [f"k{i}" for i in range(50)]
    got = await asyncio.gather(*(b.rows(k) for k in keys))
    assert [r[0][1] for r in got] == keys
    assert [len(x) for x in rec.batches] == [1, 49]


async def test_rows_are_grouped_by_key_and_misses_are_empty():
    rec = Recorder()
    b = Batcher(rec.run, max_inflight=2)
    got = await asyncio.gather(b.rows("a"), b.rows("2x"), b.rows("none"), b.rows("b"), b.rows("2y"))
    assert [[(r[1], r[2]) for r in rows] for rows in got] == [
        [("a", 0)], [("2x", 0), ("2x", 1)], [], [("b", 0)], [("2y", 0), ("2y", 1)]]
    assert [len(x) for x in rec.batches] == [1, 1, 3]  # two go at once, the rest wait and go together


async def test_a_failed_statement_fails_its_batch_only():
    rec = Recorder(fail_on="bad")
    b = Batcher(rec.run, max_inflight=1)
    first = asyncio.ensure_future(b.rows("ok"))
    await asyncio.sleep(0)
    same_batch = [asyncio.ensure_future(b.rows(k)) for k in ("bad", "c", "d")]
    assert (await first)[0][1] == "ok"
    for t in same_batch:
        with pytest.raises(RuntimeError, match="statement failed"):
            await t
    assert (await b.rows("later"))[0][1] == "later"


async def test_a_cancelled_caller_leaves_the_others_answered():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec.run, max_inflight=1)
    running = asyncio.ensure_future(b.rows("first"))
    await asyncio.sleep(0)
    waiting = {k: asyncio.ensure_future(b.rows(k)) for k in ("x", "gone", "y")}
    await asyncio.sleep(0)
    waiting["gone"].cancel()
    rec.gate.set()
    assert (await running)[0][1] == "first"
    assert (await waiting["x"])[0][1] == "x" and (await waiting["y"])[0][1] == "y"
    assert waiting["gone"].cancelled()
    assert rec.batches == [["first"], ["x", "y"]]  # the cancelled key was never sent


async def test_close_waits_for_statements_in_flight():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec.run, max_inflight=1)
    t = asyncio.ensure_future(b.rows("k"))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(b.close())
    await asyncio.sleep(0.02)
    assert not closing.done()
    rec.gate.set()
    await closing
    assert t.done() and (await t)[0][1] == "k"
