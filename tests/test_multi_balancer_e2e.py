"""Two real `kvfleet balancer` subprocesses in front of three `--engine sim` replica subprocesses
(KV events and load reports over ZMQ), knowing nothing of each other (issue #18 part 3).

Long requests are sent through the first instance only, so it has requests of its own in flight
that the second never saw; once both hold load reports showing them running, cold prompts are
explained (`POST /admin/explain`, nothing booked) on both at once. With --consistent-routing
both decide from those reports and name the same replica; counting its own requests in flight,
the first sees a different fleet than the second and they part.
"""

from __future__ import annotations

import asyncio

import pytest

from harness import multi_balancer

PROBES = 30


def agreed(consistent: bool) -> int:
    with multi_balancer.fleet(3, 2, "precise_prefix", consistent) as (_, bals):
        out = asyncio.run(multi_balancer.agreement_at_steady_load([b.url for b in bals], 3, background=2,
                                                                   probes=PROBES))
    assert out.compared == PROBES
    return out.agreed


@pytest.mark.slow
def test_two_balancers_agree_with_consistent_routing_and_not_without():
    with_mode = agreed(consistent=True)
    without = agreed(consistent=False)
    assert with_mode >= PROBES - 2, f"{with_mode} of {PROBES} agreed with --consistent-routing"
    assert without < with_mode, f"{without} of {PROBES} agreed without it, {with_mode} with it"
