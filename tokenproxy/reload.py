"""Applying a new config to a running daemon, in three steps: bind the listeners the new
config adds (the one step that can fail for outside reasons, so it goes first), build the new
token sources and Proxy without touching what serves, then commit -- after which nothing can
fail and nothing is half applied."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tokenproxy.config import Config, Listener
from tokenproxy.config.providers import subject_chain
from tokenproxy.listeners import ListeningSocket
from tokenproxy.tokens.factory import SourceFactory, open_token_store
from tokenproxy.tokens.manager import TokenManager
from tokenproxy.tokens.source import TokenSource

Bind = Callable[[Sequence[Listener]], list[ListeningSocket]]


@dataclass(slots=True)
class ListenerChange:
    """One group of listeners (proxy or admin): which stay, which were bound, which go."""

    keep: list[ListeningSocket]
    added: list[ListeningSocket]
    drop: list[ListeningSocket]

    @classmethod
    def bind(cls, current: list[ListeningSocket], wanted: Sequence[Listener],
             bind: Bind) -> ListenerChange:
        """Bind what *wanted* adds to *current*; a listener both name keeps its socket."""
        keep = [ls for ls in current if ls.listener in wanted]
        kept = {ls.listener for ls in keep}
        added = bind([li for li in wanted if li not in kept])
        drop = [ls for ls in current if ls.listener not in wanted]
        return cls(keep, added, drop)

    @property
    def listening(self) -> list[ListeningSocket]:
        return self.keep + self.added

    async def undo(self) -> None:
        for ls in self.added:
            await ls.close()

    async def commit(self) -> None:
        for ls in self.drop:
            await ls.close()


@dataclass(slots=True)
class ProviderPlan:
    """The token sources of the new config: unchanged ones kept, the others built anew --
    inheriting the running one's token when only non-identity settings changed."""

    factory: SourceFactory
    sources: dict[str, TokenSource]
    steps: list[tuple[TokenSource, TokenSource | None, bool]] = field(default_factory=list)

    @classmethod
    async def build(cls, old: Config, new: Config, current: Mapping[str, TokenSource],
                    factory: SourceFactory) -> ProviderPlan:
        store = factory.store
        same_store = new.state_path == old.state_path and new.shared_state == old.shared_state
        if not same_store or not old.persists_tokens:
            store = await open_token_store(new, factory.metrics)
        plan = cls(factory.renewed(store), {})

        def unchanged(name: str) -> bool:
            running = current.get(name)
            # A provider whose credentials were rejected starts over with the new config.
            stuck = isinstance(running, TokenManager) and running.stuck
            return (running is not None and old.providers.get(name) == new.providers[name]
                    and same_store and not stuck)

        for name, provider in new.providers.items():
            before, running = old.providers.get(name), current.get(name)
            stuck = isinstance(running, TokenManager) and running.stuck
            # A provider exchanged from another is rebuilt with it: its subject is looked
            # up in the new sources (inheriting the token, so nothing is fetched for that).
            if running is not None and all(unchanged(n)
                                           for n in subject_chain(new.providers, name)):
                plan.sources[name] = running
                continue
            fresh = plan.factory.build(provider, plan.sources)
            # A token exchanged from a subject whose identity changed is another's token.
            same = all(n in old.providers
                       and old.providers[n].identity() == new.providers[n].identity()
                       for n in subject_chain(new.providers, name))
            inherit = (isinstance(fresh, TokenManager) and isinstance(running, TokenManager)
                       and before is not None and same and not stuck)
            plan.steps.append((fresh, running, inherit))
            plan.sources[name] = fresh
        return plan

    async def discard(self, running: SourceFactory) -> None:
        """The reload failed after this plan was built: close the store it opened, if any."""
        if self.factory.store is not None and self.factory.store is not running.store:
            await self.factory.store.close()

    async def commit(self, current: Mapping[str, TokenSource]) -> list[TokenSource]:
        """Start the new sources (handing tokens over); returns the ones to close."""
        retired: list[TokenSource] = []
        for fresh, running, inherit in self.steps:
            if inherit:
                assert isinstance(fresh, TokenManager)
                assert isinstance(running, TokenManager)
                await running.close()   # lets a refresh in flight finish and persist first
                fresh.inherit(running)
            elif running is not None:
                retired.append(running)
            await fresh.start()
        retired += [src for name, src in current.items() if name not in self.sources]
        return retired

    def changed(self, current: Mapping[str, TokenSource]) -> list[str]:
        return [name for name, src in self.sources.items() if src is not current.get(name)]


async def close_quietly(sources: Sequence[TokenSource]) -> None:
    for src in sources:
        with contextlib.suppress(Exception):
            await src.close()
