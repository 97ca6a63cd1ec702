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
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
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


# Integer options that must be positive wherever they appear.
_POSITIVE = {"dim", "length", "heads", "rank", "alpha"}


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    return value
