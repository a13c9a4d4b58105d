"""The redis_server fixture (tests/helpers/redis_server.py) does what the shared-state tests
rely on: a real server on loopback, and real faults — kill, restart with the data gone, pause
(SIGSTOP) and resume."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers.net import refused
from tests.helpers.redis_server import RedisServer


def test_started_on_loopback_and_answers(redis_server: RedisServer) -> None:
    """The server runs on 127.0.0.1 at the port of its URL; a key set is read back."""
    assert f"redis://127.0.0.1:{redis_server.port}/0" == redis_server.url
    r = redis_server.client()
    assert r.set("tokenproxy:k", b"v")
    assert b"v" == r.get("tokenproxy:k")
    assert ["tokenproxy:k"] == redis_server.keys("tokenproxy:*")
    assert {"tokenproxy:k": b"v"} == redis_server.get_all()
    info = r.config_get("*")
    assert "127.0.0.1" == info["bind"]
    assert "" == info["save"]
    assert "no" == info["appendonly"]
    assert "yes" == info["protected-mode"]
    assert redis_server.dir.resolve() == Path(info["dir"]).resolve()
    assert "tokenproxy:k" == redis_server.cli("--scan").strip()    # redis-tools, as operators do


async def test_kill_refuses_connections_and_restart_starts_empty(
        redis_server: RedisServer) -> None:
    """After kill() connections are refused; restart() serves on the same port, empty."""
    port = redis_server.port
    r = redis_server.client()
    r.set("k", b"v")
    redis_server.kill()
    assert not redis_server.running
    assert await refused(port)
    with pytest.raises(redis.ConnectionError):
        r.get("k")
    redis_server.restart()
    assert port == redis_server.port
    assert redis_server.client().get("k") is None
    assert [] == redis_server.keys()


@pytest.mark.slow
def test_pause_times_out_and_resume_answers(redis_server: RedisServer) -> None:
    """A paused server accepts connections but answers nothing (a 0.5 s socket timeout
    expires); resumed, it answers again, its data intact."""
    r = redis_server.client(socket_timeout=0.5)
    r.set("k", b"v")
    redis_server.pause()
    began = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        r.get("k")
    assert 0.4 < time.monotonic() - began < 2.0      # one timeout: no retries hide it
    redis_server.resume()
    assert b"v" == redis_server.client().get("k")


def test_stop_ends_a_paused_server(tmp_path: Path) -> None:
    """stop() ends a paused (SIGSTOP) server too: SIGKILL, reaped, nothing left running."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        server.pause()
    finally:
        server.stop()
    assert not server.running
    assert server.proc is not None
    assert -9 == server.proc.returncode


def test_password(tmp_path: Path) -> None:
    """With a password the server refuses unauthenticated clients; the URL carries it."""
    with RedisServer(tmp_path / "redis", password="s3cret-redis") as server:
        assert server.url == f"redis://:s3cret-redis@127.0.0.1:{server.port}/0"
        assert server.client().ping()
        # No retries: redis-py's default (3, with backoff) takes seconds over a refusal.
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2,
                                retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        assert "PONG" == server.cli("PING").strip()
