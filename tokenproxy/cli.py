"""Command line: run, check-config, token, demo, --version. Exit 2 for config problems."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TextIO, TypeVar

import aiohttp
from aiohttp import http_parser

from tokenproxy import __version__, log
from tokenproxy.config import Config, OAuth2Provider, find_config_file, load_config
from tokenproxy.config.providers import subject_chain
from tokenproxy.config.secrets import config_secrets, exposed_warning, readable_key_warnings
from tokenproxy.config.shared_state import redacted_url
from tokenproxy.daemon import FAST_PATH_ENV, SPLICE_ENV, switch_setting
from tokenproxy.demo.run import run_demo
from tokenproxy.errors import ConfigError, TokenError, TokenProxyError
from tokenproxy.memory import tune_allocator
from tokenproxy.online import check_providers
from tokenproxy.process import make_undumpable
from tokenproxy.run import serve
from tokenproxy.terminal import visible
from tokenproxy.tokens.factory import obtain_token, open_state_store

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as shells report it


def llhttp_parser_loaded() -> bool:
    """True when aiohttp's C parser is active; several smuggling advisories hit only the other."""
    return http_parser.HttpRequestParser is not http_parser.HttpRequestParserPy


# The lowest aiohttp without a known advisory that touches a proxy (docs/security.md).
SAFE_AIOHTTP = (3, 14, 4)
ALLOW_UNSAFE_ENV = "TOKENPROXY_ALLOW_UNSAFE_HTTP"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
    return tuple(parts)


def http_stack_problem(version: str, c_parser: bool) -> str | None:
    """Why this aiohttp must not parse untrusted requests, or None when it is fine."""
    if _version_tuple(version) < SAFE_AIOHTTP:
        return (f"aiohttp {version} has known request-smuggling or parser advisories; "
                f"install aiohttp>={'.'.join(map(str, SAFE_AIOHTTP))}")
    if not c_parser:
        return ("aiohttp's C HTTP parser is not available; the pure-Python parser has had "
                "request-smuggling advisories. Install a binary aiohttp wheel")
    return None


EPILOG = """\
The config file is the first of: -c FILE, $TOKENPROXY_CONFIG, ./tokenproxy.yaml,
$XDG_CONFIG_HOME/tokenproxy/config.yaml (~/.config/...), /etc/tokenproxy/config.yaml.
-c may come before or after the command. The configuration reference is docs/configuration.md.

exit codes: 0 ok; 1 failed (a token could not be obtained, an online check failed, the HTTP
stack is unsafe, a login was denied or expired, status found a login required);
2 bad configuration (the message names the key); 130 a login interrupted (nothing stored)
"""


def _config_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", default=default,
                        help="config file (default: see below)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenproxy",
        description="A local authenticating reverse proxy: plain HTTP in, fresh tokens attached.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tokenproxy {__version__}")
    _config_option(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: a -c given before the command is not reset to None by the subparser.
        _config_option(p, argparse.SUPPRESS)
        return p

    command("run", "run the daemon in the foreground")
    check = command("check-config", "validate the config and print a summary")
    check.add_argument("--online", action="store_true",
                       help="also contact each provider once (discovery, one token request; "
                       "the token is never printed); exit 1 if any fails")
    token = command("token", "print a provider's current token")
    token.add_argument("provider", nargs="?", help="provider name (optional with one provider)")
    ca = command("ca", "print the forward proxy's CA certificate (PEM; its path on stderr), "
                 "made in the state directory if it is not there yet")
    ca.add_argument("--bundle", action="store_true",
                    help="print the system CA bundle with the CA appended, for tools that "
                    "take one file")
    exec_parser = command("exec", "run a command with HTTPS_PROXY, HTTP_PROXY, NO_PROXY and the CA "
                      "variables (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, "
                      "NODE_EXTRA_CA_CERTS) pointing at the forward proxy; exit with the "
                      "command's status")
    exec_parser.usage = "tokenproxy exec [-h] [-c FILE] [--standalone] -- COMMAND [ARGS...]"
    exec_parser.add_argument("--standalone", action="store_true",
                         help="start a private daemon on free loopback ports for the "
                         "command's lifetime, instead of using the running one")
    exec_parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                         help="the command and its arguments, after --")
    login = command("login", "log in as yourself to the providers a person logs in to (device "
                    "code or browser login; all of them that need it when none is named); "
                    "a running daemon picks the login up within a second")
    login.add_argument("provider", nargs="*", help="provider names")
    login.add_argument("--no-browser", action="store_true",
                       help="print the URL to open instead of opening a browser")
    logout = command("logout", "revoke the stored refresh token at the issuer (RFC 7009, when "
                     "it publishes a revocation endpoint) and delete the stored tokens")
    logout.add_argument("provider", nargs="*", help="provider names (default: all that a "
                        "person logs in to)")
    command("status", "one line per provider: who is logged in, until when, or what is "
            "needed; exit 1 when a login is required")
    demo = sub.add_parser("demo", help="run a self-contained demo with short-lived tokens")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    return parser


def _load(path_arg: str | None) -> Config:
    return load_config(find_config_file(path_arg, os.environ))


def _host_list(hosts: frozenset[str] | None) -> str:
    return "*" if hosts is None else ",".join(sorted(hosts))


def summary(cfg: Config) -> list[str]:
    """What check-config prints: structure, never secrets."""
    lines = [f"config: {cfg.source}" if cfg.source else "config: (built in)"]
    lines.append("listen: " + ", ".join(str(li) for li in cfg.listen))
    lines.append(f"admin_listen: {cfg.admin_listen if cfg.admin_listen else 'disabled'}")
    lines.append("security: allowed_hosts=" + _host_list(cfg.security.allowed_hosts)
                 + " admin_allowed_hosts=" + _host_list(cfg.security.admin_hosts)
                 + f" reject_cross_site={str(cfg.security.reject_cross_site).lower()}"
                 + f" reject_forwarded={str(cfg.security.reject_forwarded).lower()}"
                 + f" require_header={'set' if cfg.security.require_header else 'off'}"
                 + f" client_key={'set' if cfg.security.client_key else 'off'}")
    shared = cfg.shared_state
    if shared is not None:
        keys = len(shared.encryption_keys)
        encryption = "off" if not keys else "on" if keys == 1 else f"on ({keys} keys)"
        lines.append(f"shared_state: {redacted_url(shared.redis_url.value)} "
                     f"key_prefix={shared.key_prefix} encryption={encryption} "
                     f"lock_ttl={shared.lock_ttl:g}s timeout={shared.timeout:g}s")
        lines.append("state_path: not used (tokens live in the shared state)")
    else:
        lines.append(f"state_path: {cfg.state_path or 'none (static providers keep no state)'}")
    lines.append(f"providers ({len(cfg.providers)}):")
    for name, p in cfg.providers.items():
        # Endpoints without their query: a query string may carry a key.
        ident = {k: v.split("?", 1)[0] for k, v in p.identity().items()
                 if k != "type" and not k.endswith("_digest") and v}
        if isinstance(p, OAuth2Provider) and p.issuer is not None:
            ident = {("issuer" if k == "endpoint" else k): v for k, v in ident.items()}
        detail = " ".join(f"{k}={v}" for k, v in ident.items() if "\x00" not in v)
        if isinstance(p, OAuth2Provider):
            detail += f" client_auth={p.client_auth}"
            chain = subject_chain(cfg.providers, name)
            if len(chain) > 1:
                detail += " chain=" + " <- ".join(chain)
        lines.append(f"  {name}: {p.type_name()}" + (f" {detail.strip()}" if detail else ""))
    lines.append(f"routes ({len(cfg.routes)}):")
    for r in cfg.routes:
        lines.append(f"  {r.prefix} -> {r.upstream.url} (provider {r.provider}, "
                     f"header {r.header}, retry_on {sorted(r.retry_on)})")
    return lines


def clear_state_warning(cfg: Config) -> str | None:
    if cfg.shared_state is None or cfg.shared_state.encryption_keys:
        return None
    return ("warning: shared_state has no encryption_key_file: tokens are stored in Redis in "
            "clear text, readable by anyone who can read Redis")


def _check_config(args: argparse.Namespace, out: TextIO) -> int:
    cfg = _load(args.config)
    if cfg.shared_state is None:
        run_async(open_state_store(cfg))   # an unsafe state file fails here as at start
    redactor = log.Redactor(config_secrets(cfg))
    for line in summary(cfg):
        out.write(redactor.scrub(line) + "\n")
    # On stdout with the report: the file is valid, and stderr stays for errors.
    for warning in (exposed_warning(cfg), clear_state_warning(cfg),
                    *readable_key_warnings(cfg)):
        if warning is not None:
            out.write(redactor.scrub(warning) + "\n")
    if not args.online:
        out.write("ok\n")
        return EXIT_OK
    log.configure("error", "console", redactor=redactor)   # the report says what went wrong
    checks = run_async(check_providers(cfg, redactor))
    out.write("online:\n")
    for check in checks:
        found = f"; token endpoint {check.endpoint} (discovered)" if check.endpoint else ""
        out.write(visible(redactor.scrub(f"  {check.name}: {check.text}{found}")) + "\n")
    failed = [c.name for c in checks if not c.ok]
    out.write(f"failed: {', '.join(failed)}\n" if failed else "ok\n")
    return EXIT_FAILURE if failed else EXIT_OK


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return None
    return uvloop.new_event_loop


def run_async(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)


def _run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    for switch in (FAST_PATH_ENV, SPLICE_ENV):   # a bad value is refused before starting
        switch_setting(os.environ, switch)
    problem = http_stack_problem(aiohttp.__version__, llhttp_parser_loaded())
    if problem is not None and os.environ.get(ALLOW_UNSAFE_ENV) != "1":
        sys.stderr.write(f"tokenproxy: {problem}, or set {ALLOW_UNSAFE_ENV}=1 to run anyway.\n")
        return EXIT_FAILURE
    os.umask(0o077)   # state files and sockets are ours alone
    tuned = tune_allocator()
    make_undumpable()   # processes of our user cannot read our tokens from /proc or ptrace
    redactor = log.Redactor(config_secrets(cfg))
    log.configure(cfg.log.level, cfg.log.format, redactor=redactor)
    return run_async(serve(cfg, redactor=redactor, allocator_tuned=tuned))


def _token(args: argparse.Namespace, out: TextIO) -> int:
    cfg = _load(args.config)
    names = list(cfg.providers)
    name = args.provider
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"token: name a provider ({', '.join(names)})")
        name = names[0]
    if name not in cfg.providers:
        raise ConfigError(f"token: no provider named {name!r} ({', '.join(names)})")
    redactor = log.Redactor(config_secrets(cfg))
    log.configure("warning", "console", redactor=redactor)
    try:
        value = run_async(obtain_token(cfg, name, redactor=redactor))
    except TokenError as exc:
        sys.stderr.write(f"tokenproxy: {exc.detail}\n")
        return EXIT_FAILURE
    out.write(value + "\n")
    return EXIT_OK


def _write_bytes(out: TextIO, data: bytes) -> None:
    # A CA bundle is not ASCII (certifi's comments name issuers): written as it is.
    raw = getattr(out, "buffer", None)
    if raw is None:
        out.write(data.decode("utf-8", "replace"))
        return
    out.flush()
    raw.write(data)
    raw.flush()


def _ca(args: argparse.Namespace, out: TextIO) -> int:
    from tokenproxy.forward import tools  # the CA's cryptography, only for this command

    cfg = _load(args.config)
    ca = run_async(tools.load_ca(cfg))
    text, notes = tools.ca_output(ca, bundle=args.bundle, environ=os.environ)
    for note in notes:
        sys.stderr.write(f"tokenproxy: {note}\n")
    _write_bytes(out, text)
    return EXIT_OK


def exec_command(parsed: Sequence[str], argv: Sequence[str]) -> list[str] | None:
    """The command of ``exec``: what follows the first ``--`` of *argv*, when that is all
    argparse left (*parsed*, with or without the ``--``); None when there is no ``--``, no
    command, or words before the ``--``."""
    if "--" not in argv:
        return None
    tail = list(argv[list(argv).index("--") + 1:])
    if not tail or list(parsed) not in (["--", *tail], tail):
        return None
    return tail


def _exec(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from tokenproxy.forward import tools  # the CA's cryptography, only for this command

    command = exec_command(args.argv, argv)
    if command is None:
        sys.stderr.write("usage: tokenproxy exec [-c FILE] [--standalone] -- COMMAND "
                         "[ARGS...]\ntokenproxy exec: name the command after --\n")
        return EXIT_CONFIG
    cfg = _load(args.config)
    tools.forward_settings(cfg, "exec")
    make_undumpable()   # the command runs as our user: it must not read our memory
    if not args.standalone:
        return run_async(tools.exec_with_daemon(cfg, command, environ=os.environ,
                                                err=sys.stderr))
    problem = http_stack_problem(aiohttp.__version__, llhttp_parser_loaded())
    if problem is not None and os.environ.get(ALLOW_UNSAFE_ENV) != "1":
        sys.stderr.write(f"tokenproxy: {problem}, or set {ALLOW_UNSAFE_ENV}=1 to run anyway.\n")
        return EXIT_FAILURE
    redactor = log.Redactor(config_secrets(cfg))
    log.configure("warning", "console", redactor=redactor)
    return run_async(tools.exec_standalone(cfg, command, environ=os.environ, err=sys.stderr,
                                           redactor=redactor))


def _demo(args: argparse.Namespace) -> int:
    tuned = tune_allocator()
    redactor = log.Redactor()
    log.configure("info", "console", redactor=redactor)
    return run_async(run_demo(args.port, redactor, allocator_tuned=tuned))


def _login_command(args: argparse.Namespace, out: TextIO) -> int:
    from tokenproxy.login import LoginFailed
    from tokenproxy.login.run import run_login_command

    cfg = _load(args.config)
    redactor = log.Redactor(config_secrets(cfg))
    log.configure("warning", "console", redactor=redactor)
    try:
        return run_async(run_login_command(
            cfg, args.command, getattr(args, "provider", []), out=out, redactor=redactor,
            no_browser=getattr(args, "no_browser", False)))
    except LoginFailed as exc:
        sys.stderr.write(f"tokenproxy: {exc}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        sys.stderr.write("tokenproxy: interrupted; the login under way was not stored\n")
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help(sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "check-config":
            return _check_config(args, sys.stdout)
        if args.command == "token":
            return _token(args, sys.stdout)
        if args.command == "demo":
            return _demo(args)
        if args.command == "ca":
            return _ca(args, sys.stdout)
        if args.command == "exec":
            return _exec(args, sys.argv[1:] if argv is None else argv)
        if args.command in ("login", "logout", "status"):
            return _login_command(args, sys.stdout)
        return _run(args)
    except ConfigError as exc:
        sys.stderr.write(f"tokenproxy: {exc}\n")
        return EXIT_CONFIG
    except TokenProxyError as exc:
        sys.stderr.write(f"tokenproxy: {exc}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:  # pragma: no cover - a signal before the handlers were installed
        return EXIT_OK
