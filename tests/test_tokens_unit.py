"""Pure token functions: strict grant parsing, expiry arithmetic, JSON Pointers, the state file."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.fakes import REFRESH_TOKEN, TOKEN
from tests.helpers.idp import jwt
from tests.helpers.logs import CapturedLogs
from tokenproxy.tokens.expiry import MIN_REFRESH_GAP, jwt_exp, lifetime, refresh_delay
from tokenproxy.tokens.grant import (
    MAX_LIFETIME,
    GrantFailed,
    grant_from,
    parse_expires_in,
    resolve_pointer,
    strict_json,
)
from tokenproxy.tokens.source import MAX_TOKEN_LENGTH, Token, is_usable_token
from tokenproxy.tokens.state import StateFileError, StateStore, StoredTokens, identity_key

NOW = 1_800_000_000.0


# -- strict JSON and grants ------------------------------------------------------------------


class TestStrictJson:
    @pytest.mark.parametrize("text", [
        b'{"expires_in": NaN}',
        b'{"expires_in": Infinity}',
        b'{"expires_in": -Infinity}',
        b'{"access_token": "a", "access_token": "b"}',
        b'{"access_token": "a"',
        b"<html><body>captive portal</body></html>",
        b"\xff\xfe{}",
        b"",
        b"[" * 100_000,
    ])
    def test_refuses_what_json_loads_would_accept_or_choke_on(self, text: bytes) -> None:
        """NaN, duplicate keys, garbage and deep nesting are a GrantFailed, nothing else."""
        with pytest.raises(GrantFailed) as info:
            strict_json(text)
        assert "the answer is not valid JSON" == info.value.reason

    def test_huge_exponent_becomes_infinity_not_an_error(self) -> None:
        """1e999 is valid JSON text that json turns into inf; the expiry parser must cope."""
        assert math.inf == strict_json(b'{"expires_in": 1e999}')["expires_in"]

    @pytest.mark.slow
    @given(st.binary(max_size=200))
    @settings(max_examples=300, deadline=None)
    def test_any_bytes_parse_or_fail_cleanly(self, data: bytes) -> None:
        """Whatever a token endpoint sends, parsing raises GrantFailed or gives a value."""
        try:
            doc = strict_json(data)
        except GrantFailed:
            return
        with contextlib.suppress(GrantFailed):
            grant_from(doc)


class TestGrantFrom:
    def test_reads_the_rfc6749_fields(self) -> None:
        """access_token, refresh_token and expires_in come from their standard names."""
        grant = grant_from({"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600,
                            "refresh_token": REFRESH_TOKEN, "unknown_field": [1, 2]})
        assert (TOKEN, 3600.0, REFRESH_TOKEN, False) == (
            grant.access_token, grant.expires_in, grant.refresh_token, grant.expires_in_ignored)

    def test_secrets_stay_out_of_repr(self) -> None:
        """A Grant printed by accident shows neither token."""
        text = repr(grant_from({"access_token": TOKEN, "refresh_token": REFRESH_TOKEN}))
        assert TOKEN not in text
        assert REFRESH_TOKEN not in text

    @pytest.mark.parametrize("doc", [
        {}, {"token_type": "Bearer"}, {"access_token": None}, {"access_token": ""},
        {"access_token": 12345}, {"access_token": ["x"]}, {"access_token": {"v": "x"}},
        [], "just a string", None, 42,
    ])
    def test_answer_without_access_token_is_a_failure(self, doc: Any) -> None:
        """No usable access_token string: GrantFailed naming the problem, not a crash."""
        with pytest.raises(GrantFailed) as info:
            grant_from(doc)
        assert "the answer carries no access token" == info.value.reason

    @pytest.mark.parametrize("token", [
        "abc\r\nX-Injected: 1", "abc\x00def", "has space", "t\u00e9l\u00e9phone", "tab\there",
        "x" * (MAX_TOKEN_LENGTH + 1),
    ])
    def test_access_token_that_cannot_be_a_header_is_refused(self, token: str) -> None:
        """CR/LF, NUL, spaces, non-ASCII or an oversize token never reach a header."""
        with pytest.raises(GrantFailed) as info:
            grant_from({"access_token": token})
        assert "header" in info.value.reason
        assert token not in info.value.reason

    @pytest.mark.parametrize("refresh", ["rt\r\nx", "rt with space", "r\u00e9", "r" * 20000])
    def test_unusable_refresh_token_is_refused(self, refresh: str) -> None:
        """A refresh token with control characters, spaces, non-ASCII or too long is a failure."""
        with pytest.raises(GrantFailed):
            grant_from({"access_token": TOKEN, "refresh_token": refresh})

    @pytest.mark.parametrize("refresh", [None, "", 17, ["x"]])
    def test_absent_refresh_token_is_none(self, refresh: Any) -> None:
        """A missing, empty or non-string refresh_token means 'none sent' (keep the old one)."""
        assert None is grant_from({"access_token": TOKEN, "refresh_token": refresh}).refresh_token

    def test_custom_pointers(self) -> None:
        """The json and command providers read their fields through configured pointers."""
        doc = {"data": {"accessToken": TOKEN, "refreshToken": REFRESH_TOKEN, "ttl": "120"}}
        grant = grant_from(doc, access_pointer="/data/accessToken",
                           refresh_pointer="/data/refreshToken", expires_pointer="/data/ttl")
        assert (TOKEN, 120.0, REFRESH_TOKEN) == (
            grant.access_token, grant.expires_in, grant.refresh_token)

    def test_no_pointers_for_optional_fields(self) -> None:
        """Without refresh and expiry pointers only the access token is read."""
        grant = grant_from({"access_token": TOKEN, "refresh_token": REFRESH_TOKEN,
                            "expires_in": 60}, refresh_pointer=None, expires_pointer=None)
        assert (None, None, False) == (grant.refresh_token, grant.expires_in,
                                       grant.expires_in_ignored)

    @pytest.mark.parametrize(("raw", "ignored"), [
        (True, True), ("NaN", True), (0, True), (-5, True), (math.inf, True), ("Infinity", True),
        ("soon", True), (None, False), (60, False),
    ])
    def test_unusable_expires_in_is_flagged(self, raw: Any, ignored: bool) -> None:
        """An unusable expires_in sets expires_in_ignored; null or absent does not."""
        grant = grant_from({"access_token": TOKEN, "expires_in": raw})
        assert ignored == grant.expires_in_ignored
        assert (60.0 if raw == 60 else None) == grant.expires_in


class TestExpiresIn:
    @pytest.mark.parametrize(("raw", "expected"), [
        (3600, 3600.0),
        (0.5, 0.5),
        (299.9, 299.9),
        ("3600", 3600.0),
        (" 60 ", 60.0),
        (0, None),
        (-5, None),
        (-0.0, None),
        ("0", None),
        ("-5", None),
        ("+5", None),
        ("1e3", None),
        ("12.5", None),
        ("", None),
        ("9" * 13, None),
        (True, None),
        (False, None),
        (math.nan, None),
        (math.inf, None),
        (-math.inf, None),
        ("NaN", None),
        ("Infinity", None),
        ("\u00b2", None),            # str.isdigit() is True, int() refuses it
        ("\u0663\u0666\u0660\u0660", None),   # Arabic-Indic digits: not an RFC number
        pytest.param(10**400, None, id="int-beyond-float"),   # JSON allows it
        (1e20, MAX_LIFETIME),
        (86401, MAX_LIFETIME),
        ("999999999999", MAX_LIFETIME),
        (None, None),
        ([60], None),
        ({"s": 60}, None),
    ])
    def test_table(self, raw: Any, expected: float | None) -> None:
        """expires_in must be a finite positive number or ASCII digit string, capped at a day."""
        assert expected == parse_expires_in(raw)

    @given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                        lambda inner: st.lists(inner, max_size=3), max_leaves=5))
    @settings(max_examples=400, deadline=None)
    @pytest.mark.slow
    def test_never_raises(self, raw: Any) -> None:
        """Any JSON value gives None or a lifetime in (0, one day]."""
        value = parse_expires_in(raw)
        assert value is None or 0 < value <= MAX_LIFETIME

    def test_huge_integer_from_raw_json_text(self) -> None:
        """A 400-digit expires_in in the answer is ignored, not an OverflowError."""
        doc = strict_json(b'{"access_token": "tok", "expires_in": 1' + b"0" * 400 + b"}")
        grant = grant_from(doc)
        assert (None, True) == (grant.expires_in, grant.expires_in_ignored)


# -- expiry ----------------------------------------------------------------------------------


class TestJwtExp:
    def test_reads_exp_without_verifying(self) -> None:
        """The exp claim of an unsigned JWT-shaped token is read as Unix time."""
        assert NOW + 30 == jwt_exp(jwt({"sub": "x", "exp": NOW + 30}))

    def test_padding_free_payload(self) -> None:
        """JWT parts are base64url without padding, of any length."""
        for pad in range(4):
            claims = {"exp": 1234, "p": "x" * pad}
            assert 1234.0 == jwt_exp(jwt(claims))

    @pytest.mark.parametrize("token", [
        "opaque-token",
        "a.b",
        "a.b.c.d",
        "a.!!!.c",
        "a." + base64.urlsafe_b64encode(b"\xff\xfe").decode() + ".c",
        jwt(b"not json"),
        jwt([1, 2, 3]),
        jwt({"sub": "no exp"}),
        jwt({"exp": "1234"}),
        jwt({"exp": True}),
        jwt({"exp": None}),
        jwt(b'{"exp": 1' + b"0" * 400 + b"}"),
        "a." + "A" * 9000 + ".c",
    ])
    def test_not_a_usable_exp(self, token: str) -> None:
        """Anything but a numeric exp in a three-part token gives None, never an exception."""
        assert None is jwt_exp(token)

    @given(st.text(max_size=300))
    @settings(max_examples=300, deadline=None)
    def test_never_raises(self, token: str) -> None:
        """Arbitrary text is not a crash."""
        value = jwt_exp(token)
        assert value is None or isinstance(value, float)


class TestLifetime:
    def test_expires_in_wins_over_jwt(self) -> None:
        """expires_in is used even when the token is a JWT with another exp."""
        assert 60.0 == lifetime(60.0, jwt({"exp": NOW + 999}), NOW)

    def test_jwt_exp_when_no_expires_in(self) -> None:
        """Without expires_in the lifetime is exp minus now."""
        assert 30.0 == lifetime(None, jwt({"exp": NOW + 30}), NOW)

    def test_jwt_lifetime_capped_at_a_day(self) -> None:
        """A JWT valid for a year counts as valid for one day."""
        assert MAX_LIFETIME == lifetime(None, jwt({"exp": NOW + 365 * 86400}), NOW)

    @pytest.mark.parametrize("exp", [NOW - 10, NOW])
    def test_jwt_already_expired_is_unknown(self, exp: float) -> None:
        """An exp in the past gives no lifetime (a 401 will refresh it), not a negative one."""
        assert None is lifetime(None, jwt({"exp": exp}), NOW)

    def test_opaque_token_is_unknown(self) -> None:
        """No expires_in and no JWT: unknown."""
        assert None is lifetime(None, TOKEN, NOW)


class TestRefreshDelay:
    @pytest.mark.parametrize(("life", "margin", "expected"), [
        (3600.0, 60.0, 3540.0),    # the margin
        (10.0, 60.0, 5.0),         # capped at half the lifetime
        (10.0, 4.0, 6.0),
        (120.0, 60.0, 60.0),       # exactly half
        (100.0, 0.0, 100.0),
        (1.0, 60.0, MIN_REFRESH_GAP),   # never a refresh loop
        (0.2, 0.0, MIN_REFRESH_GAP),
    ])
    def test_table(self, life: float, margin: float, expected: float) -> None:
        """Refresh at lifetime - min(margin, lifetime/2), never sooner than the minimum gap."""
        assert expected == refresh_delay(life, margin)


class TestToken:
    def test_expiry_on_the_monotonic_deadline(self) -> None:
        """A token is expired from its deadline on; an unknown expiry never expires."""
        tok = Token("t", 100.0, 1)
        assert (False, True, True) == (tok.expired(99.9), tok.expired(100.0), tok.expired(101))
        assert False is Token("t", None, 1).expired(1e18)

    def test_repr_hides_the_value(self) -> None:
        """A token printed by accident does not show its value."""
        assert TOKEN not in repr(Token(TOKEN, 1.0, 1))

    @pytest.mark.parametrize(("value", "ok"), [
        ("abc.DEF-123_~+/=", True), ("", False), ("a b", False), ("a\nb", False),
        ("\u00e9", False), ("x" * MAX_TOKEN_LENGTH, True),
    ])
    def test_usable_token(self, value: str, ok: bool) -> None:
        """Only bounded visible ASCII without spaces can go into a header."""
        assert ok == is_usable_token(value)


# -- JSON Pointers ---------------------------------------------------------------------------


class TestJsonPointer:
    DOC: ClassVar[dict[str, Any]] = {
        "accessToken": "top",
        "data": {"accessToken": "nested", "list": ["zero", {"x": "one"}]},
        "a/b": "slash",
        "m~n": "tilde",
        "~1": "literal",
        "": "empty key",
        "num": 0,
    }

    @pytest.mark.parametrize(("pointer", "expected"), [
        ("/accessToken", "top"),
        ("/data/accessToken", "nested"),
        ("/data/list/0", "zero"),
        ("/data/list/1/x", "one"),
        ("/a~1b", "slash"),
        ("/m~0n", "tilde"),
        ("/~01", "literal"),       # ~0 is decoded after ~1: "~01" is "~1", not "/"
        ("/", "empty key"),
        ("/num", 0),
    ])
    def test_resolves(self, pointer: str, expected: Any) -> None:
        """RFC 6901 pointers, escapes included, find their value."""
        assert expected == resolve_pointer(self.DOC, pointer)

    def test_empty_pointer_is_the_whole_document(self) -> None:
        """"" points at the root."""
        assert self.DOC is resolve_pointer(self.DOC, "")

    @pytest.mark.parametrize("pointer", [
        "/missing", "/data/missing", "/data/list/2", "/data/list/-", "/data/list/x",
        "/accessToken/deeper", "/num/0", "/data/list/0/0",
    ])
    def test_missing_is_none(self, pointer: str) -> None:
        """A step that does not exist gives None, never an exception."""
        assert None is resolve_pointer(self.DOC, pointer)


# -- the state file --------------------------------------------------------------------------


def entry(n: int = 1, **kw: Any) -> StoredTokens:
    base: dict[str, Any] = {"access_token": f"access-{n}", "expires_at": NOW + 60,
                            "refresh_token": f"refresh-{n}", "obtained_at": NOW, "seed": None}
    base.update(kw)
    return StoredTokens(**base)


class TestIdentityKey:
    def test_stable_and_named(self) -> None:
        """The key is 'provider:hash' and the same for the same identity in any order."""
        a = identity_key("corp", {"endpoint": "https://a/token", "client_id": "c", "user": "u"})
        b = identity_key("corp", {"user": "u", "client_id": "c", "endpoint": "https://a/token"})
        assert a == b
        assert a.startswith("corp:")
        assert 16 == len(a.split(":", 1)[1])

    @pytest.mark.parametrize("change", [
        {"endpoint": "https://b/token"}, {"client_id": "d"}, {"user": "v"},
    ])
    def test_another_endpoint_client_or_user_is_another_key(self, change: dict[str, str]) -> None:
        """Tokens of one token URL, client or user are never reused for another."""
        ident = {"endpoint": "https://a/token", "client_id": "c", "user": "u"}
        assert identity_key("corp", ident) != identity_key("corp", {**ident, **change})


class TestStoredTokens:
    def test_round_trip(self) -> None:
        """to_json and from_json are inverse."""
        e = entry(seed="abcd")
        assert e == StoredTokens.from_json(json.loads(json.dumps(e.to_json())))

    @pytest.mark.parametrize("doc", [
        None, [], "x",
        {"access_token": 1}, {"refresh_token": ["x"]}, {"expires_at": "soon"},
        {"expires_at": True}, {"obtained_at": None}, {"obtained_at": False}, {"seed": 5},
    ])
    def test_wrong_types_are_refused(self, doc: Any) -> None:
        """An entry with a field of the wrong type is not trusted."""
        assert None is StoredTokens.from_json(doc)

    def test_repr_hides_tokens(self) -> None:
        """Neither token shows in the repr."""
        text = repr(entry(access_token=TOKEN, refresh_token=REFRESH_TOKEN))
        assert TOKEN not in text
        assert REFRESH_TOKEN not in text


def corrupt_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


class TestStateStore:
    def test_missing_file_reads_empty(self, tmp_path: Path) -> None:
        """No state file yet: no entries, nothing created."""
        store = StateStore(tmp_path / "state.json")
        assert {} == store.read_all()
        assert [] == list(tmp_path.iterdir())

    def test_write_then_read(self, tmp_path: Path) -> None:
        """An entry written is read back; other providers' entries are kept."""
        store = StateStore(tmp_path / "state.json")
        store.write("a:1", entry(1))
        store.write("b:2", entry(2))
        store.write("a:1", entry(3))
        assert {"a:1": entry(3), "b:2": entry(2)} == store.read_all()
        assert entry(2) == StateStore(tmp_path / "state.json").read("b:2")
        assert None is store.read("c:3")

    def test_file_format(self, tmp_path: Path) -> None:
        """The file is versioned JSON with one object per provider key."""
        path = tmp_path / "state.json"
        StateStore(path).write("a:1", entry(1))
        doc = json.loads(path.read_text())
        assert 1 == doc["version"]
        assert entry(1).to_json() == doc["providers"]["a:1"]

    def test_mode_0600_and_directory_0700(self, tmp_path: Path) -> None:
        """The file is private to its owner; a directory it creates is too."""
        path = tmp_path / "new" / "dir" / "state.json"
        StateStore(path).write("a:1", entry())
        assert 0o600 == stat.S_IMODE(path.stat().st_mode)
        assert 0o700 == stat.S_IMODE(path.parent.stat().st_mode)

    def test_rewrite_keeps_mode_0600(self, tmp_path: Path) -> None:
        """A file loosened by hand is replaced by a 0600 one on the next write."""
        path = tmp_path / "state.json"
        store = StateStore(path)
        store.write("a:1", entry(1))
        path.chmod(0o644)
        store.write("a:1", entry(2))
        assert 0o600 == stat.S_IMODE(path.stat().st_mode)

    def test_no_temp_file_left_after_writes(self, tmp_path: Path) -> None:
        """Each write renames its temp file into place."""
        store = StateStore(tmp_path / "state.json")
        for n in range(5):
            store.write("a:1", entry(n))
        assert ["state.json"] == sorted(
            p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))

    def test_loose_permissions_warned(self, tmp_path: Path, logs: CapturedLogs) -> None:
        """A group- or world-readable state file is read but warned about."""
        path = tmp_path / "state.json"
        StateStore(path).write("a:1", entry())
        path.chmod(0o644)
        assert entry() == StateStore(path).read("a:1")
        [ev] = logs.events("state_file_permissions")
        assert "0o644" == ev["mode"]

    @pytest.mark.parametrize("content", [
        b"",
        b'{"version": 1, "provid',
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"[]",
        b'"a string"',
        b'{"providers": {}}',
        b'{"version": 2, "providers": {}}',
        b'{"version": 1, "providers": []}',
    ], ids=["empty", "truncated", "bad-json", "bad-utf8", "list", "string", "no-version",
            "future-version", "providers-list"])
    def test_corrupt_file_set_aside(
        self, tmp_path: Path, logs: CapturedLogs, content: bytes
    ) -> None:
        """A corrupt file is set aside unchanged with a warning; the next write starts anew."""
        path = tmp_path / "state.json"
        path.write_bytes(content)
        store = StateStore(path)
        assert {} == store.read_all()
        [aside] = corrupt_files(path)
        assert content == aside.read_bytes()
        assert not path.exists()
        [ev] = logs.events("state_file_corrupt")
        assert str(aside) == ev["moved_to"]
        store.write("a:1", entry())
        assert {"a:1": entry()} == StateStore(path).read_all()
        assert content == aside.read_bytes()

    def test_bad_entries_skipped_good_ones_kept(self, tmp_path: Path) -> None:
        """One entry of the wrong shape does not cost the others."""
        path = tmp_path / "state.json"
        path.write_text(json.dumps({"version": 1, "providers": {
            "good:1": entry().to_json(), "bad:2": {"access_token": 5}, "bad:3": "x"}}))
        assert {"good:1": entry()} == StateStore(path).read_all()
        assert [] == corrupt_files(path)

    def test_symlink_not_followed(self, tmp_path: Path, logs: CapturedLogs) -> None:
        """A state path that is a symlink is not read through (O_NOFOLLOW): it is unsafe."""
        real = tmp_path / "elsewhere.json"
        StateStore(real).write("a:1", entry())
        link = tmp_path / "state.json"
        link.symlink_to(real)
        assert {} == StateStore(link).read_all()
        assert ["is a symbolic link"] == [
            ev["reason"] for ev in logs.events("state_file_unsafe")]

    def test_stray_temp_files_removed_on_write(self, tmp_path: Path) -> None:
        """Old stray temp files go at the first write; a fresh one and other files stay."""
        path = tmp_path / "state.json"
        old = tmp_path / ".state.json.4242.123.tmp"
        old.write_bytes(b'{"version": 1, "provi')
        past = time.time() - 3600
        os.utime(old, (past, past))
        fresh = tmp_path / ".state.json.4343.456.tmp"
        fresh.write_bytes(b"{")
        other = tmp_path / ".other.json.1.2.tmp"
        other.write_bytes(b"x")
        os.utime(other, (past, past))
        store = StateStore(path)
        assert {} == store.read_all()   # temp files are never read as state
        store.write("a:1", entry())
        assert not old.exists()
        assert fresh.exists()
        assert other.exists()
        assert {"a:1": entry()} == store.read_all()

    def test_unwritable_location_raises_state_file_error(self, tmp_path: Path) -> None:
        """A failed write is a StateFileError (kept in memory by the caller), no temp left."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        store = StateStore(blocker / "state.json")
        with pytest.raises(StateFileError):
            store.write("a:1", entry())
        assert ["not-a-dir"] == sorted(p.name for p in tmp_path.iterdir())

    @pytest.mark.slow
    async def test_lock_excludes_another_store_on_the_same_file(self, tmp_path: Path) -> None:
        """Two StateStores (as two processes would have) on one file take turns: flock."""
        path = tmp_path / "state.json"
        first, second = StateStore(path), StateStore(path)
        order: list[str] = []

        async def other() -> None:
            async with second.locked("a:1", 5):
                order.append("second")

        async with first.locked("a:1", 5):
            task = asyncio.create_task(other())
            await asyncio.sleep(0.2)
            assert not task.done()
            order.append("first done")
        await asyncio.wait_for(task, 5)
        assert ["first done", "second"] == order

    @pytest.mark.slow
    async def test_lock_is_released_by_a_cancelled_waiter(self, tmp_path: Path) -> None:
        """A task cancelled while waiting for the file lock does not keep it forever."""
        path = tmp_path / "state.json"
        first, second = StateStore(path), StateStore(path)

        async def wait_for_lock() -> None:
            async with second.locked("a:1", 5):
                await asyncio.sleep(10)

        async with first.locked("a:1", 5):
            waiter = asyncio.create_task(wait_for_lock())
            await asyncio.sleep(0.1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        # The cancelled waiter must not keep (or later take) the lock.
        third = StateStore(path)

        async def take() -> None:
            async with third.locked("a:1", 5):
                pass

        await asyncio.wait_for(take(), 5)

    async def test_lock_in_unwritable_directory_does_not_block(
        self, tmp_path: Path, logs: CapturedLogs
    ) -> None:
        """When the lock file cannot be created, token handling goes on (with a warning)."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        store = StateStore(blocker / "state.json")
        async with store.locked("a:1", 5):
            pass
        assert 1 == len(logs.events("state_lock_failed"))
