"""The package's layering (docs/architecture.md), checked on the imports themselves, so the
folder tree keeps telling the truth about what depends on what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tokenproxy"


def imports(path: Path) -> set[str]:
    """Every module *path* imports, absolute, at any level (TYPE_CHECKING blocks included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            out.add(node.module)
    return out


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("path", modules("proxy/rules"), ids=lambda p: p.name)
def test_rules_are_pure(path: Path) -> None:
    """proxy/rules: no aiohttp, no asyncio, no I/O, nothing of the request paths."""
    bad = {m for m in imports(path)
           if m.split(".")[0] in {"aiohttp", "asyncio", "httptools", "socket", "multidict"}
           or m.startswith(("tokenproxy.proxy.fast_path", "tokenproxy.proxy.aiohttp_path",
                            "tokenproxy.proxy.runtime", "tokenproxy.tokens"))}
    assert set() == bad


@pytest.mark.parametrize("path", modules("proxy"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_proxy_knows_token_sources_only_by_their_interface(path: Path) -> None:
    bad = {m for m in imports(path)
           if m.startswith("tokenproxy.tokens") and m != "tokenproxy.tokens.source"}
    assert set() == bad


@pytest.mark.parametrize("path", modules("proxy/fast_path") + modules("proxy/aiohttp_path"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_two_paths_do_not_import_each_other(path: Path) -> None:
    other = ("tokenproxy.proxy.aiohttp_path" if "fast_path" in path.parts
             else "tokenproxy.proxy.fast_path")
    assert set() == {m for m in imports(path) if m.startswith(other)}


@pytest.mark.slow
@pytest.mark.parametrize("path", modules("tokens"), ids=lambda p: p.name)
def test_tokens_know_nothing_of_the_request_paths(path: Path) -> None:
    assert set() == {m for m in imports(path) if m.startswith(("tokenproxy.proxy",
                                                                "tokenproxy.daemon"))}


@pytest.mark.parametrize("path", modules("config"), ids=lambda p: p.name)
def test_config_depends_on_nothing_of_ours_but_errors(path: Path) -> None:
    assert set() == {m for m in imports(path) if m.startswith("tokenproxy.")
                     and not m.startswith(("tokenproxy.config", "tokenproxy.errors"))}


@pytest.mark.parametrize("name", ["runtime.py", "failures.py"])
def test_what_both_paths_share_imports_neither(name: str) -> None:
    assert set() == {m for m in imports(PACKAGE / "proxy" / name) if m.startswith(
        ("tokenproxy.proxy.fast_path", "tokenproxy.proxy.aiohttp_path"))}


@pytest.mark.parametrize("path", modules("proxy") + modules("tokens"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_request_paths_and_tokens_know_nothing_of_the_forward_proxy(path: Path) -> None:
    """forward/ builds on proxy/ (an intercepted host is a one-route Proxy); never the
    reverse."""
    assert set() == {m for m in imports(path) if m.startswith("tokenproxy.forward")}


@pytest.mark.parametrize("path", modules("forward"), ids=lambda p: p.name)
def test_the_forward_proxy_uses_the_paths_only_through_the_daemon(path: Path) -> None:
    """The forward proxy is handed its request paths (service.MakeInner) by the daemon; it
    builds neither path's protocol itself."""
    assert set() == {m for m in imports(path) if m.startswith(
        ("tokenproxy.proxy.aiohttp_path", "tokenproxy.proxy.fast_path.connection"))}
