"""The fair admission queue (balancer/fairness.py): WFQ order in tokens, priorities, the tenant
under its share, early shedding with Retry-After, the limits, classes from headers and keys, config."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from balancer.config import BalancerConfig
from balancer.fairness import ClassConfig, FairnessConfig, FairQueue, Refused, apply_arguments
from protocol.openai_api import APIError


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(capacity: int = 1, classes=(), clock=None, **kw) -> FairQueue:
    cfg = FairnessConfig(enabled=True, classes=tuple(classes), **kw)
    return FairQueue(cfg, lambda: capacity, clock=clock or Clock())


def klass(q: FairQueue, name: str) -> ClassConfig:
    return q.cfg.klass(name)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def enqueue(q: FairQueue, name: str, cost: int, tenant: str = "", log: list | None = None):
    """A task waiting for admission; on admission it appends (name, cost) to log."""

    async def go():
        t = await q.admit(klass(q, name), tenant or name, cost)
        if log is not None:
            log.append(name)
        return t

    task = asyncio.create_task(go())
    await settle()
    return task


async def drain(q: FairQueue, holders: list, tasks) -> None:
    """Release the oldest holder, then the next, until every task is admitted (in the order the
    queue chooses: the tasks log it)."""
    holders = list(holders)
    pending = list(tasks)
    while pending:
        assert holders, "requests wait while nothing is in flight"
        holders.pop(0).release(0.1)
        await settle()
        for t in [t for t in pending if t.done()]:
            pending.remove(t)
            holders.append(t.result())
    for h in holders:
        h.release(0.1)


def test_wfq_serves_tokens_not_requests_in_weight_proportion():
    async def main():
        q = make(capacity=2, classes=[ClassConfig("a"), ClassConfig("b")], overcommit=1)
        # Each tenant holds its share of the fleet, so neither may pass the queue.
        holders = [await q.admit(klass(q, "b"), "b", 300), await q.admit(klass(q, "a"), "a", 300)]
        log: list[str] = []
        tasks = [await enqueue(q, "b", 300, log=log) for _ in range(3)]  # b queued first ...
        tasks += [await enqueue(q, "a", 100, log=log) for _ in range(9)]  # ... a's cheaper requests after
        await drain(q, holders, tasks)
        return log

    log = asyncio.run(main())
    # (overcommit 1: no tenant passes the full fleet, the queue's order alone decides.)
    # Equal weights, equal tokens: three of a's 100-token requests per 300-token one of b's
    # (finish tags past the holders' virtual time 600: a 700, 800, 900, ...; b 900, 1200, 1500; a
    # request-fair queue would alternate them).
    assert log == ["a", "a", "b", "a", "a", "a", "b", "a", "a", "a", "b", "a"], log


def test_weights_split_the_queue():
    async def main():
        q = make(classes=[ClassConfig("gold", weight=3.0), ClassConfig("bronze")], overcommit=1)
        holders = [await q.admit(klass(q, "bronze"), "bronze", 100)]
        log: list[str] = []
        tasks = [await enqueue(q, "bronze", 100, log=log) for _ in range(6)]
        tasks += [await enqueue(q, "gold", 100, log=log) for _ in range(6)]
        await drain(q, holders, tasks)
        return log

    log = asyncio.run(main())
    first8 = log[:8]
    assert first8.count("gold") == 6, log  # 3:1 while both wait


def test_priority_goes_first_whatever_the_tags():
    async def main():
        q = make(classes=[ClassConfig("batch"), ClassConfig("urgent", priority=1)], overcommit=1)
        holders = [await q.admit(klass(q, "batch"), "batch", 10)]
        log: list[str] = []
        tasks = [await enqueue(q, "batch", 10, log=log) for _ in range(3)]
        tasks += [await enqueue(q, "urgent", 1000, log=log) for _ in range(3)]
        await drain(q, holders, tasks)
        return log

    assert asyncio.run(main()) == ["urgent"] * 3 + ["batch"] * 3


def test_a_tenant_under_its_share_is_admitted_at_once_while_the_flood_waits():
    async def main():
        q = make(capacity=4, classes=[ClassConfig("a"), ClassConfig("flood")])
        held = [await q.admit(klass(q, "flood"), "flood", 100) for _ in range(4)]  # the fleet is full
        waiting = [await enqueue(q, "flood", 100) for _ in range(5)]
        assert not any(t.done() for t in waiting)
        ta = await asyncio.wait_for(q.admit(klass(q, "a"), "a", 100), 1)  # no wait: under its share
        assert ta.waited_s == 0 and q.inflight == 5
        tb = await asyncio.wait_for(q.admit(klass(q, "a"), "a", 100), 1)  # still under half the tokens
        assert tb.waited_s == 0
        for t in held:
            t.release(0.1)
        await settle()
        # Four slots freed, six in flight allowed over: only the flood's head moves until a's share
        # is reached; nothing is over the overcommit bound.
        assert q.inflight <= 2 * 4
        for t in waiting:
            t.cancel()
        await settle()
        assert q.waiting == 0

    asyncio.run(main())


def test_the_fleets_capacity_is_read_once_per_admission_and_once_per_pump():
    """`capacity()` scans the registry (Registry.usable): an admission, and each pump of the
    queue, reads it once however many flows it weighs."""
    async def main():
        reads = []

        def capacity() -> int:
            reads.append(1)
            return 4

        q = FairQueue(FairnessConfig(enabled=True, classes=(ClassConfig("a"), ClassConfig("flood"))), capacity,
                      clock=Clock())
        held = [await q.admit(klass(q, "flood"), "flood", 100) for _ in range(4)]  # the fleet is full
        waiting = [await enqueue(q, "flood", 100) for _ in range(3)]
        reads.clear()
        ta = await asyncio.wait_for(q.admit(klass(q, "a"), "a", 100), 1)  # under its share, past capacity
        assert ta.waited_s == 0 and len(reads) == 1
        reads.clear()
        held[0].release(0.1)  # one pump, weighing the flood's head against the capacity
        assert len(reads) == 1
        for t in held[1:] + [ta]:
            t.release(0.1)
        await settle()
        for t in waiting:
            if t.done():
                t.result().release(0.1)
            else:
                t.cancel()
        await settle()
        assert q.waiting == 0

    asyncio.run(main())


def test_the_flooding_tenant_never_passes_a_full_fleet():
    async def main():
        q = make(capacity=4, classes=[ClassConfig("a"), ClassConfig("flood")])
        ta = await q.admit(klass(q, "a"), "a", 100)  # a is active, lightly
        held = [await q.admit(klass(q, "flood"), "flood", 100) for _ in range(3)]  # the fleet is full
        t = await enqueue(q, "flood", 100)  # nothing of its own waits, yet it is ahead of a: it waits
        assert not t.done() and q.inflight == 4
        ta.release(0.1)
        await settle()
        assert t.done() and q.inflight == 4  # a slot freed: its turn
        for h in held + [t.result()]:
            h.release(0.1)

    asyncio.run(main())


def test_flood_is_shed_early_with_retry_after_and_the_other_class_never():
    async def main():
        clock = Clock()
        q = make(capacity=2, clock=clock, classes=[ClassConfig("a", ttft_target_s=1.0),
                                                   ClassConfig("flood", ttft_target_s=1.0)])
        # Measure the drain rate: the flood backlogged, one 100-token request every 0.1 s.
        held = [await q.admit(klass(q, "flood"), "flood", 100) for _ in range(2)]
        queued = [await enqueue(q, "flood", 100) for _ in range(8)]
        for _ in range(8):
            clock.t += 0.1
            held.pop(0).release(0.05)
            await settle()
            held += [t.result() for t in queued if t.done() and t.result() not in held and t.result().open]
            queued = [t for t in queued if not t.done()]
        assert q.rate == pytest.approx(1000.0, rel=0.3)
        # Now a burst: 1 s of work queues (10 requests), then the 11th is predicted to miss 1 s.
        burst = [await enqueue(q, "flood", 100) for _ in range(10)]
        with pytest.raises(Refused) as e:
            await q.admit(klass(q, "flood"), "flood", 100)
        assert e.value.reason == "predicted_wait" and e.value.retry_after_s >= 1
        shed = q.metrics.shed.labels("flood", "predicted_wait")._value.get()
        assert shed >= 1
        # Tenant a, within its share, is admitted at once through the same full queue.
        ta = await asyncio.wait_for(q.admit(klass(q, "a"), "a", 100), 1)
        assert ta.waited_s == 0
        assert q.metrics.shed.labels("a", "predicted_wait")._value.get() == 0
        for t in burst:
            t.cancel()
        await settle()

    asyncio.run(main())


def test_queue_full_and_timeout_answer_refused():
    async def main():
        q = make(capacity=1, max_queue=2, queue_timeout_s=0.05)
        d = klass(q, "default")
        held = await q.admit(d, "default", 10)
        waiting = [await enqueue(q, "default", 10) for _ in range(2)]
        with pytest.raises(Refused) as full:
            await q.admit(d, "default", 10)
        assert full.value.reason == "queue_full"
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, Refused) and r.reason == "queue_timeout" for r in results)
        assert q.waiting == 0
        held.release(None)
        assert q.inflight == 0

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_queue_and_keeps_no_slot():
    async def main():
        q = make(capacity=1)
        held = await q.admit(klass(q, "default"), "default", 10)
        t = await enqueue(q, "default", 10)
        t.cancel()
        await settle()
        assert q.waiting == 0
        held.release(None)
        assert q.inflight == 0
        again = await asyncio.wait_for(q.admit(klass(q, "default"), "default", 10), 1)
        again.release(None)

    asyncio.run(main())


def test_calibration_learns_that_estimates_were_optimistic():
    async def main():
        clock = Clock()
        q = make(capacity=1, clock=clock)
        q.rate = 1000.0  # as if measured
        held = await q.admit(klass(q, "default"), "", 100)
        waiting = [await enqueue(q, "default", 100) for _ in range(4)]
        for _ in range(4):
            clock.t += 1.0  # each 100-token request takes 1 s to leave, 10x the estimate
            held.release(0.1)
            await settle()
            held = next(t.result() for t in waiting if t.done() and t.result().open)
        held.release(0.1)
        return q.calibration

    assert asyncio.run(main()) > 2.0


def test_classes_come_from_the_api_key_then_the_header():
    q = make(classes=[ClassConfig("paid", api_keys=("sk-paid",)), ClassConfig("batch")])
    h = {"X-Kvfleet-Class": "batch", "X-Kvfleet-Tenant": "team-7"}
    assert q.identify(h.get, "sk-paid")[0].name == "paid"  # the key wins over the header
    c, tenant = q.identify(h.get, None)
    assert (c.name, tenant) == ("batch", "team-7")
    assert q.identify({}.get, None)[0].name == "default"
    with pytest.raises(APIError) as e:
        q.identify({"X-Kvfleet-Class": "vip"}.get, None)
    assert e.value.status == 400 and "batch" in e.value.message


def test_config_file_flags_and_conflicts():
    cfg = BalancerConfig.from_dict({"replicas": ["http://h:1"], "fairness": {
        "enabled": True, "max_inflight_per_replica": 4,
        "classes": {"interactive": {"weight": 2, "priority": 1, "ttft_target_s": 0.5, "api_keys": ["k1"]},
                    "batch": {}}}})
    f = cfg.fairness
    assert f.enabled and f.max_inflight_per_replica == 4
    assert [c.name for c in f.classes] == ["interactive", "batch", "default"]
    assert f.klass("interactive") == ClassConfig("interactive", 2.0, 1, 0.5, ("k1",))
    with pytest.raises(ValueError, match="unknown keys"):
        BalancerConfig.from_dict({"fairness": {"enable": True}})
    with pytest.raises(ValueError, match="both on"):
        BalancerConfig.from_dict({"fairness": {"enabled": True}, "max_inflight_per_replica": 4})
    with pytest.raises(ValueError, match="two classes"):
        FairnessConfig(classes=(ClassConfig("a", api_keys=("k",)), ClassConfig("b", api_keys=("k",))))
    args = SimpleNamespace(fairness=True, fair_class=["batch,weight=0.5,ttft=2", "default,priority=1"],
                           fair_default_class=None, fair_max_inflight_per_replica=3, fair_queue_timeout=None,
                           fair_max_queue=None)
    out = apply_arguments(BalancerConfig(), args).fairness
    assert out.enabled and out.max_inflight_per_replica == 3
    assert out.klass("batch") == ClassConfig("batch", weight=0.5, ttft_target_s=2.0)
    assert out.klass("default").priority == 1 and len(out.classes) == 2
    with pytest.raises(ValueError, match="bad class spec"):
        ClassConfig.parse("x,speed=3")



def test_with_the_queue_on_a_request_s_output_length_is_predicted_once():
    """A real balancer (predictive policy, the fair queue on) in front of a real server: the
    queue's cost and the policy read one prediction per request."""
    import aiohttp

    from harness.fleet import balancer
    from tests.test_front import backend

    async def main():
        with backend() as url:
            async with balancer([url], policy="predictive", fairness=FairnessConfig(enabled=True)) as (base, b):
                predictor, calls = b.router.predictor, []

                class Counting:
                    def __getattr__(self, name):
                        return getattr(predictor, name)

                    def predict_point(self, prepared):
                        calls.append(prepared)
                        return predictor.predict_point(prepared)

                b.router.predictor = Counting()
                async with aiohttp.ClientSession() as s:
                    for _ in range(3):
                        async with s.post(base + "/v1/completions",
                                          json={"prompt": "hello there", "max_tokens": 3}) as r:
                            assert r.status == 200
                            await r.read()
                assert len(calls) == 3

    asyncio.run(main())
