"""The config file itself: where it is looked for, and its YAML read without surprises (no
duplicate keys, no secret echoed in a syntax error)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from tokenproxy.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: the later one would silently win."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Only the mapping's own keys: one that overrides a key merged in with "<<" is not a duplicate.
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:   # unhashable; construct_mapping reports it with its line
            continue
        if duplicate:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)



def parse_yaml(text: str, where: str) -> object:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        # Only the position and the problem: the snippet could show a secret, and so could a
        # quoted name in the problem (an unquoted password "*x" is an undefined alias 'x').
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        problem = _QUOTED.sub(_mask_quoted, exc.problem or "syntax error")
        raise ConfigError(f"{where}: line {line}: invalid YAML ({problem})") from None
    except yaml.YAMLError:
        raise ConfigError(f"{where}: invalid YAML") from None
    except ValueError:   # an impossible date or time such as 2024-13-45
        raise ConfigError(f"{where}: invalid YAML (a date or time that does not exist)") from None


_QUOTED: Final = re.compile(r"'([^']*)'")


def _mask_quoted(m: re.Match[str]) -> str:
    """Keep YAML's token names ('<scalar>') and single, maybe escaped, characters; mask the rest."""
    text = m[1]
    keep = (text.startswith("<") and text.endswith(">")) or len(text) <= 1 or (
        len(text) == 2 and text.startswith("\\"))
    return m[0] if keep else "'...'"


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path:
    """-c, then $TOKENPROXY_CONFIG, ./tokenproxy.yaml, the XDG config dir, /etc/tokenproxy."""
    if explicit:
        return Path(explicit)
    candidates: list[Path] = []
    if env.get("TOKENPROXY_CONFIG"):
        return Path(env["TOKENPROXY_CONFIG"])
    candidates.append(Path("tokenproxy.yaml"))
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "/")) / ".config")
    candidates.append(Path(xdg) / "tokenproxy" / "config.yaml")
    candidates.append(Path("/etc/tokenproxy/config.yaml"))
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        "config: no file found (tried -c, $TOKENPROXY_CONFIG, "
        + ", ".join(str(p) for p in candidates)
        + ")"
    )

