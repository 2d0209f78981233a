"""Load a YAML file plus `section.key=value` overrides into a checked `MegarlConfig`.

Every mistake becomes a `ConfigError` naming the key (and the file and line for YAML), before
any process group or model exists: unknown keys (with the closest valid one), wrong types,
missing required values, out-of-range values and incompatible combinations.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .root import MegarlConfig
from .validate import validate


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> MegarlConfig:
    """The checked configuration from an optional YAML file and command-line overrides."""
    schema = OmegaConf.structured(MegarlConfig)
    merged = schema
    if path is not None:
        data, lines = _read_yaml(Path(path))
        _check_keys(data, MegarlConfig, "", lambda key: f"{path}:{lines.get(key, '?')}: ")
        merged = _merge(merged, data, lambda key: f"{path}:{lines.get(key, '?')}: ")
    if overrides:
        data = _parse_overrides(overrides)
        _check_keys(data, MegarlConfig, "", lambda key: "command line: ")
        merged = _merge(merged, data, lambda key: "command line: ")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        key = missing[0]
        raise ConfigError(key, f"is required: set it in the YAML file or pass {key}=VALUE")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(getattr(exc, "full_key", "") or "", _short(exc)) from None
    return validate(config)


def to_yaml(config: MegarlConfig) -> str:
    """The resolved configuration as YAML (printed at start and saved in the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_dict(data: dict[str, Any]) -> MegarlConfig:
    """A checked configuration from a nested dict (programmatic use: demo, tests)."""
    schema = OmegaConf.structured(MegarlConfig)
    _check_keys(data, MegarlConfig, "", lambda key: "")
    merged = _merge(schema, data, lambda key: "")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(missing[0], "is required")
    return validate(OmegaConf.to_object(merged))


# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """The file's mapping and, for every dotted key, the line it is on (1-based)."""
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping of sections")
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    walk(node, "")
    return data, lines


def _parse_overrides(overrides: Sequence[str]) -> dict:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError("", f"command line: {item!r} is not of the form section.key=value")
        if "." not in key:
            raise ConfigError(key, f"command line: {item!r} names a section, not a key; "
                              f"use {key}.<key>=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError("", f"command line: {_short(exc)}") from None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_keys(data: Any, cls: type, prefix: str, where) -> None:
    """Reject keys the schema does not have, suggesting the closest valid one."""
    if not isinstance(data, dict):
        return
    fields = _field_types(cls)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(
                full, f"{where(full)}unknown key{hint}; valid keys of "
                f"{prefix.rstrip('.') or 'the config'} are: {valid}"
            )
        typ = fields[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(full, f"{where(full)}is a section; expected a mapping of its "
                                  f"keys, got {value!r}")
            _check_keys(value, typ, full + ".", where)


def _merge(base: DictConfig, data: dict, where) -> DictConfig:
    try:
        return OmegaConf.merge(base, OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(key, f"{where(key)}{_short(exc)}") from None


def _short(exc: Exception) -> str:
    """OmegaConf's message without its trailing object/reference dump."""
    message = str(exc).split("\n")[0].strip()
    return message.replace("could not be converted to", "is not a valid")
