"""Property-based tests (Hypothesis) of the wire contract at a live worker (issue 21).

Hypothesis draws batches of raw requests across the whole contract (every header with
wrong types, sizes and encodings, bodies with every OpenAI field of a wrong value,
missing and duplicate correlation ids, huge and empty bodies, forged and missing
``reply_to``) and cancels of every shape, with valid requests alongside
(:mod:`hutch_bench.scenarios.fuzz_cases`). One worker serves the whole module; each batch
is published at once and checked against the shared oracle
(:mod:`pipeline.testing.contract_oracle`): each input gets exactly its documented answer
(one reply, or the documented drop to the parking lot with its reason), the worker never
crashes or stalls, and the valid requests are answered.

The run is derandomized (the same examples every time, bounded for CI);
``HUTCH_PROPERTY_EXAMPLES`` asks for more, and ``hutch bench scenario fuzz`` is the long run.
"""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
import pytest_asyncio

from hutch_bench.cli import parse, run_scenario
from hutch_bench.scenarios.fuzz_drive import check_examples
from hutch_bench.scenarios.fuzz_rig import WireRig, wire_rig
from pipeline.ops.cancel import operator_cancel

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = int(os.environ.get("HUTCH_PROPERTY_EXAMPLES", "80"))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig(amqp_url: str) -> AsyncIterator[WireRig]:
    async with wire_rig(amqp_url, f"t{uuid.uuid4().hex[:8]}") as live:
        yield live


async def test_every_wire_input_gets_its_documented_answer(rig: WireRig) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(check_examples, rig, loop, examples=EXAMPLES)
    tally = rig.tally
    print(f"\nproperties: {tally.batches} batches, {tally.cases} requests, {tally.cancels} "
          f"cancels, {tally.valid} valid alongside; defects {dict(tally.defects)}")
    assert not rig.worker_task.done()
    assert tally.cases >= EXAMPLES  # every example reached the worker
    assert (tally.stalls, tally.crashes, tally.problems) == (0, 0, [])


async def test_the_fuzz_scenario_runs_and_reports(amqp_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``hutch bench scenario fuzz --quick``: the long run's code on a small load."""
    monkeypatch.setenv("HUTCH_AMQP_URL", amqp_url)
    out = io.StringIO()
    report = await run_scenario(parse(["scenario", "fuzz", "--quick"]), out=out)
    assert report["inputs"] >= 300 and report["batches"] >= 10
    assert (report["crashes"], report["stalls"], report["problem_count"]) == (0, 0, 0)
    assert all(t["met"] for t in report["targets"]), out.getvalue()
    assert "MET      0 stalls" in out.getvalue()


# -- what the property test found (fixed), each a focused regression test ----------------


async def test_a_cancel_answers_only_the_publishers_direct_reply_to(rig: WireRig) -> None:
    """Found by the property test: a cancel's answer went to whatever ``reply_to`` it
    named, from the worker's user (who may write anywhere): any client could put a
    message with a correlation id of its choice into another client's reply queue (a
    second, forged "reply" to a pending request), a work queue or the parking lot."""
    victim = rig.shape.forged_reply_tos[0]
    exchange = await rig.channel.get_exchange(rig.names.cancel_exchange)
    for cid, reply_to in (("inject-1", rig.shape.reply_queue), ("inject-2", victim),
                          ("inject-3", rig.names.parked_queue)):
        await exchange.publish(aio_pika.Message(
            b"", correlation_id=cid, reply_to=reply_to, user_id=rig.settings.amqp_user),
            routing_key="")
    cancelled = rig.worker._cancels._cancelled
    async with asyncio.timeout(10):
        while "inject-3" not in cancelled:
            await asyncio.sleep(0.01)
    # hutch cancel's answer (direct reply-to) still comes, and nothing went anywhere else.
    [result] = await operator_cancel(rig.settings, ["inject-4"], wait_s=5)
    assert len(result.answered) == 1
    await asyncio.sleep(0.2)  # an answer published with the cancel would be here by now
    victim_queue = await rig.channel.declare_queue(victim, passive=True)
    assert (rig.replies, rig.parked) == ({}, {})
    assert victim_queue.declaration_result.message_count == 0
