"""The one copy of each test helper. Test modules and tests/conftest.py (the fixtures) import
from here; nothing here imports a test module or the conftest.

    config.py           configs as dicts and files, the make_proxy fixture's type
    fakes.py            the suite's secrets, hand-moved clocks, a recording aiohttp upstream
    logs.py             the captured log lines the autouse log sweep checks, token events
    wait.py             bounded polling: a condition, a daemon's readiness, a provider's state
    metrics.py          reading a daemon's metrics (refreshes, retry outcomes)
    client.py           requests through aiohttp's client: the answer, or its status
    net.py              free, closed and taken ports; client sockets that read slowly or never
    rawhttp.py          raw HTTP/1.x clients, exact bytes both ways (one that keeps every
                        byte received, for parsing answers off its buffer)
    rawupstream.py      a raw upstream that runs a script per connection, and scripts
    stdlib_upstream.py  an upstream on http.server, which leaves bodies unread
    idp.py              the demo Issuer as identity provider, with a fault hook and an API tap;
                        a discovery metadata server
    daemon_proc.py      a daemon in a child process
    redis_server.py     a real redis-server on loopback, to kill, restart, pause and resume
    replicas.py         shared_state replicas: their config, key files, answers; a RedisStore
                        and an entry's key name for the store's own tests
    forward.py          the forward proxy: a TLS and a plain upstream named localhost, a config
    tls.py              a CA of the tests' own and server certificates it signs (openssl);
                        a client CA, client certificates, server contexts requiring them
    keys.py             signing keys as 0600 PEM files and their public halves for joserfc,
                        JWTs made elsewhere (a projected service-account token), the mTLS
                        material of a test process
    assertion_issuer.py a token endpoint that verifies client assertions, jwt-bearer and
                        token exchange with joserfc (not tokenproxy's PyJWT), and mTLS
    transport.py        a recording double of asyncio's transport, for protocol unit tests
    proxy.py            a Proxy (tokenproxy.proxy.runtime) from a config, for unit tests
"""
