"""Live settings a node program declares (``node.setting(...)``) and the control channel
changes (``{"op": "config", "set": {...}}``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OnChange = Callable[[Any, Any], None]  # (new value, previous value)


class ConfigError(ValueError):
    """A config change the node refuses; the message is shown to people."""


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    on_change: OnChange | None = None

    @property
    def kind(self) -> str:
        if isinstance(self.default, bool):
            return "bool"
        if isinstance(self.default, int):
            return "int"
        if isinstance(self.default, float):
            return "float"
        return "choice" if self.choices is not None else "str"

    def coerce(self, value: Any) -> Any:
        """Return ``value`` as this setting's type, or raise ConfigError saying why not."""
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{self.key} must be true or false, got {value!r}")
            return value
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{self.key} must be a number, got {value!r}")
            if not math.isfinite(value) or (kind == "int" and value != int(value)):
                raise ConfigError(f"{self.key} must be a whole number, got {value!r}")
            low = -math.inf if self.minimum is None else self.minimum
            high = math.inf if self.maximum is None else self.maximum
            if not low <= value <= high:
                raise ConfigError(f"{self.key} must be between {low:g} and {high:g}, got {value!r}")
            return int(value) if kind == "int" else float(value)
        if not isinstance(value, str):
            raise ConfigError(f"{self.key} must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.key} must be one of {', '.join(self.choices)}, got {value!r}")
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "default": self.default}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.minimum is not None:
            out["min"] = self.minimum
        if self.maximum is not None:
            out["max"] = self.maximum
        return out


class Config(Mapping[str, Any]):
    """The current values, read like a dict: ``node.config["policy"]``."""

    def __init__(self) -> None:
        self._settings: dict[str, Setting] = {}
        self._values: dict[str, Any] = {}

    def declare(
        self,
        key: str,
        default: Any,
        *,
        choices: Sequence[str] | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        on_change: OnChange | None = None,
    ) -> Any:
        if key in self._settings:
            raise ValueError(f"setting {key!r} is declared twice")
        if not isinstance(default, bool | int | float | str):
            raise TypeError(f"setting {key!r}: the default must be a bool, number or string")
        choice_tuple = tuple(choices) if choices is not None else None
        setting = Setting(key, default, choice_tuple, minimum, maximum, on_change)
        value = setting.coerce(default)  # a bad default is the program's bug: fail at start
        self._settings[key] = setting
        self._values[key] = value
        return value

    def apply(self, changes: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """Validate every change first, then apply them all (or none). Returns
        ``(key, new, previous)`` for the values that actually changed; the caller announces
        them and then calls ``notify`` for each."""
        if not changes:
            raise ConfigError("config: 'set' names no setting")
        validated: dict[str, Any] = {}
        for key, value in changes.items():
            setting = self._settings.get(key)
            if setting is None:
                known = ", ".join(sorted(self._settings)) or "none"
                raise ConfigError(f"unknown setting {key!r} (this node has: {known})")
            validated[key] = setting.coerce(value)
        changed = []
        for key, value in validated.items():
            previous = self._values[key]
            if value != previous:
                self._values[key] = value
                changed.append((key, value, previous))
        return changed

    def notify(self, key: str, value: Any, previous: Any) -> None:
        """Run the setting's ``on_change`` (after the change has been announced)."""
        callback = self._settings[key].on_change
        if callback is not None:
            callback(value, previous)

    def schema(self) -> dict[str, dict[str, Any]]:
        return {key: s.schema() for key, s in self._settings.items()}

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)
