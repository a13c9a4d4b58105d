"""The request paths: a client's request in, the upstream's answer out, token attached.

    rules/         what is checked, forwarded, retried and answered -- pure, on bytes, once
    runtime.py     Proxy: the rules bound to one config (routes, token sources, TLS, metrics,
                   the retry-once decision, the access log); rebuilt on reload
    fast_path/     tokenproxy's own HTTP/1.1 protocol for the common request (llhttp heads,
                   bytes piped to a pooled upstream connection)
    aiohttp_path/  aiohttp's server and client for the rest (chunked and 100-continue bodies,
                   HTTP/1.0, WebSocket, every refusal), and the handover target

A connection starts on the fast path (when it is on); a request the fast path does not take is
handed, with the connection, to the aiohttp path. Both call the same rules through the same
Proxy, so an answer does not depend on the path that gave it (tests/test_paths_agree.py).
"""
