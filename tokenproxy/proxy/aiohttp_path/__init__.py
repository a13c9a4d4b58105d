"""aiohttp's server and client, for every request the fast path hands over (see handler.py)."""
