"""The shortest path through the product: a request goes out with the token and comes back."""

from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestServer

from tests.helpers.config import MakeProxy, proxy_config, upstream_url
from tests.helpers.fakes import TOKEN, FakeUpstream
from tests.helpers.logs import CapturedLogs


async def test_request_gets_token_and_answer(
    make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream, logs: CapturedLogs
) -> None:
    """A plain GET reaches the upstream with the bearer token and the answer streams back."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
    url = f"http://127.0.0.1:{daemon.port()}/echo/x?q=1"
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert 200 == resp.status
        doc = await resp.json()
    assert "/echo/x?q=1" == doc["raw_path"]
    assert [f"Bearer {TOKEN}"] == fake_upstream.seen[-1].header("Authorization")
    [event] = logs.events("request")
    assert "/echo/x" == event["path"]
    assert 200 == event["status"]
