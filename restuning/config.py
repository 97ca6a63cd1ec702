"""Plain, serialisable method configs: a dataclass per method, JSON in and out.

Each field's `metadata["help"]` is the one description the trainer's command line and the
studio's forms show, so an option is documented in exactly one place.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar


def option(default, help: str, choices=None, **kwargs):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (dict, list, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


@dataclasses.dataclass
class MethodConfig:
    method: ClassVar[str] = ""

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            problem = _type_problem(value, hints.get(f.name))
            if problem:
                raise ConfigError(f"{self.method}: {f.name} must be {problem}, got {value!r}")
            if choices is not None:
                values = value if isinstance(value, (list, tuple)) else [value]
                bad = [v for v in values if v not in choices]
                if bad:
                    raise ConfigError(f"{self.method}: {f.name} has {bad}; choose from {', '.join(map(str, choices))}")
            if isinstance(value, int) and not isinstance(value, bool) and f.name in _POSITIVE and value <= 0:
                raise ConfigError(f"{self.method}: {f.name} must be positive, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **{k: _plain(v) for k, v in dataclasses.asdict(self).items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        data = {k: v for k, v in data.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.method}: unknown option(s) {unknown}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
                value = tuple(value)
            kwargs[key] = value
        config = cls(**kwargs)
        config.validate()
        return config


def _type_problem(value, hint) -> str | None:
    """What `value` should have been for a field typed `hint` (a file's header or a form can hold
    anything JSON can), or None when it fits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "text"
    if hint in (tuple, list) or origin in (tuple, list):
        return None if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value) else "a list of names"
    if hint is dict or origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        return None if ok else "a mapping of names to names"
    return None


# Integer options that must be positive wherever they appear.
_POSITIVE = {"dim", "length", "heads", "rank", "alpha"}


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    return value
