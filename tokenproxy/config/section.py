"""One YAML mapping of the file, read as the model dataclass it becomes (its schema)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tokenproxy.config.model import choices_of, default_of, yaml_keys
from tokenproxy.config.named_files import read_secret_file
from tokenproxy.config.values import Secret
from tokenproxy.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")


class Section:
    """A YAML mapping, key by key. Once given its schema it refuses the keys the schema does
    not have, and a key left out (or null) reads as the schema's default: the model states
    both, once. Reading a key the schema lacks is a bug in the loader, not in the file."""

    def __init__(self, raw: object, where: str,
                 schema: type[DataclassInstance] | None = None) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping")
        for key in raw:
            if not isinstance(key, str):
                raise ConfigError(f"{where or 'config'}: keys must be strings, got {key!r}")
        self.raw: dict[str, Any] = raw
        self.where = where
        self.schema: type[DataclassInstance] | None = None
        self.keys: tuple[str, ...] | None = None     # None: any key (a name, a header)
        if schema is not None:
            self.read_as(schema)

    def read_as(self, schema: type[DataclassInstance], *extra: str) -> None:
        """Take *schema*'s keys (and *extra* ones) as the only ones. A typo is reported first,
        before the "required" error it would otherwise cause."""
        keys = (*extra, *yaml_keys(schema))
        for key in self.raw:
            if key not in keys:
                raise ConfigError(f"{self.path(key)}: unknown key{_did_you_mean(key, keys)}")
        self.schema, self.keys = schema, keys

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return self.value(key) is not None

    def value(self, key: str) -> Any:
        """The value as written; None when the key is left out."""
        assert self.keys is None or key in self.keys, f"{self.path(key)} is not in the model"
        return self.raw.get(key)

    def default(self, key: str) -> Any:
        return None if self.schema is None else default_of(self.schema, key)

    def parse(self, key: str, parser: Callable[[object, str], T]) -> T:
        """The value through *parser*, or the default when the key is left out or null."""
        if not self.has(key):
            default: T = self.default(key)
            return default
        return parser(self.raw[key], self.path(key))

    def optional(self, key: str, parser: Callable[[object, str], T]) -> T | None:
        """As parse, for a key whose default is None: not set."""
        return self.parse(key, parser)

    def string(self, key: str) -> str | None:
        value = self.value(key)
        if value is None:
            default: str | None = self.default(key)
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{self.path(key)}: expected a string")
        return str(value)

    def boolean(self, key: str) -> bool:
        value = self.value(key)
        if value is None:
            value = self.default(key)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"   # "${FLAG:-false}" arrives as a string
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path(key)}: expected true or false")
        return value

    def choice(self, key: str) -> Any:
        """One of the arguments of the schema's Literal field *key*."""
        assert self.schema is not None
        choices = choices_of(self.schema, key)
        value = self.value(key)
        if value is None:
            value = self.default(key)
        if value not in choices:
            raise ConfigError(f"{self.path(key)}: expected one of {', '.join(choices)}")
        return value

    def secret(self, key: str) -> Secret | None:
        """``key`` inline, or ``key_file`` read now (and again on reload); not both."""
        file_key = f"{key}_file"
        inline, from_file = self.has(key), self.has(file_key)
        if inline and from_file:
            raise ConfigError(f"{self.path(key)}: give {key} or {file_key}, not both")
        if inline:
            if not isinstance(self.raw[key], str):
                # YAML reads `token: 0123` as 83 and `12:30` as 750: refuse, do not guess.
                raise ConfigError(f"{self.path(key)}: quote the value (YAML read it as a "
                                  f"{type(self.raw[key]).__name__}, not text)")
            return Secret(self.raw[key])
        if from_file:
            path = self.string(file_key)
            assert path is not None
            return Secret(read_secret_file(Path(path), self.path(file_key)))
        return None


def _did_you_mean(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
