"""A token exchanged from another provider's token (``subject_token_provider``): where the
subject comes from, and whether it has changed since the last exchange."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tokenproxy.errors import TokenError, TokenUnavailable
from tokenproxy.tokens.grant import GrantFailed
from tokenproxy.tokens.source import TokenSource


class Subject:
    """The provider *name* among *sources* (the mapping the daemon serves from, so a reload
    that rebuilds the subject is seen: the chain is rebuilt with it, see reload.py)."""

    def __init__(self, name: str, sources: Mapping[str, TokenSource]) -> None:
        self.name = name
        self._sources = sources
        # The subject token of the token in use: a new one means ours is out of date.
        self.used: str | None = None
        # The one an exchange in flight presents: it becomes ``used`` once that exchange's
        # token is in use (settle), not before, or requests meanwhile would take the old
        # token for a current one.
        self._asked: str | None = None

    async def token(self) -> str:
        """The subject's current token, remembered as used. Its provider failing is a failed
        call of ours (backoff as usual, healing with it), never a rejection."""
        try:
            tok = await self._sources[self.name].current()
        except TokenError as exc:
            retry = exc.retry_after if isinstance(exc, TokenUnavailable) else None
            raise GrantFailed(f"subject_token_provider {self.name!r}: {exc.detail}",
                              retry) from None
        self._asked = tok.value
        return tok.value

    def settle(self) -> None:
        """The exchange that asked last gave the token now in use."""
        if self._asked is not None:
            self.used, self._asked = self._asked, None

    @property
    def asking(self) -> str | None:
        """The subject token of the exchange in flight (or just done)."""
        return self._asked

    def current(self) -> str | None:
        """The subject's valid token now, if it has one at hand."""
        tok = self._sources[self.name].valid_now()
        return None if tok is None else tok.value

    def moved(self) -> bool:
        """Whether the subject holds a valid token other than the one last exchanged."""
        used = self.used
        if used is None:
            return False
        tok = self._sources[self.name].valid_now()
        return tok is not None and tok.value != used

    def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call *wake* whenever the subject gets a new token (where its source can say so);
        returns what undoes that."""
        source = self._sources.get(self.name)
        add = getattr(source, "watch", None)
        if add is None:
            return lambda: None
        undo: Callable[[], None] = add(wake)
        return undo
