"""Logging in as yourself (docs/login.md): `tokenproxy login`, `logout` and `status` for the
providers a person logs in to (device code, browser login). The daemon never logs in itself:
it refreshes what a login stored, and answers login_required until there is one."""

from __future__ import annotations


class LoginFailed(Exception):
    """The login did not happen (denied, expired, refused): said to the person as it is."""
