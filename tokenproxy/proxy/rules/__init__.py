"""The proxy's rules: what is checked, forwarded, retried and answered, stated once for both
request paths. Pure functions and small classes on bytes and config: no aiohttp, no asyncio,
no I/O (as h11 keeps HTTP's rules apart from any transport)."""
