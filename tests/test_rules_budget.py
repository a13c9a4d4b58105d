"""The replay budget (proxy/rules/budget.py): bytes of request bodies held for a retry, across
all requests and both paths, bounded by limits.max_replay_total; and a fast-path body's use of
it, reserved as its bytes arrive (proxy/fast_path/body.py). Daemons giving it back however a
request ends: tests/test_limits.py."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from tokenproxy import __version__
from tokenproxy.metrics import Metrics
from tokenproxy.proxy.fast_path.body import RequestBody
from tokenproxy.proxy.rules.budget import ReplayBudget


def budget(total: int) -> tuple[ReplayBudget, CollectorRegistry]:
    registry = CollectorRegistry()
    return ReplayBudget(total, Metrics(registry, __version__)), registry


def held(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("tokenproxy_replay_buffered_bytes")


def exceeded(registry: CollectorRegistry, route: str) -> float | None:
    return registry.get_sample_value("tokenproxy_replay_budget_exceeded_total",
                                     {"route": route})


def test_reservations_up_to_the_total_are_held_and_shown() -> None:
    b, registry = budget(100)
    assert b.reserve(60, "/a")
    assert b.reserve(40, "/b")          # exactly the total
    assert (100, 100.0) == (b.held, held(registry))
    b.release(60)
    assert (40, 40.0) == (b.held, held(registry))


def test_a_reservation_past_the_total_is_refused_and_counted_by_route() -> None:
    b, registry = budget(100)
    assert b.reserve(90, "/a")
    assert not b.reserve(11, "/b")
    assert not b.reserve(11, "/b")
    assert (90, 90.0) == (b.held, held(registry))
    assert (2.0, None) == (exceeded(registry, "/b"), exceeded(registry, "/a"))
    assert b.reserve(10, "/b")          # what still fits is held


def test_releasing_nothing_changes_nothing() -> None:
    b, registry = budget(100)
    b.release(0)
    assert (0, 0.0) == (b.held, held(registry))


async def test_a_body_reserves_as_it_arrives_and_gives_back_once() -> None:
    b, _ = budget(100)
    body = RequestBody(80, complete=asyncio.get_running_loop().create_future(), whole=True,
                       budget=b, route="/")
    body.reserve(30)
    body.reserve(30)
    assert (60, 60, True) == (b.held, body.reserved, body.whole)
    body.release()
    body.release()
    assert (0, 0, True) == (b.held, body.reserved, body.released)
    body.reserve(20)                    # bytes dropped after the exchange: nothing held
    assert 0 == b.held


async def test_a_body_past_the_budget_streams_instead() -> None:
    """When the budget runs out mid-body, the body is no longer replayable: the exchange
    stops waiting for it (``complete``) and streams what is held."""
    b, registry = budget(50)
    body = RequestBody(80, complete=asyncio.get_running_loop().create_future(), whole=True,
                       budget=b, route="/up")
    body.reserve(40)
    body.reserve(40)
    assert (False, True) == (body.whole, body.complete.done())
    assert (40, 40, 1.0) == (b.held, body.reserved, exceeded(registry, "/up"))
    body.release()
    assert 0 == b.held
