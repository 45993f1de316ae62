"""Loading a config: YAML files in `conf/` and command-line `key.sub=value` overrides merged,
in that order, onto a dataclass schema (rlsys.config's `Config`), each key checked against it.

`conf=NAME` loads `conf/NAME.yaml`; a YAML file may name a parent with `defaults: [other]`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config name, key or value; the message is one line naming the problem."""


def available_configs(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in conf_dir.glob("*.yaml"))


def _load_yaml_chain(name: str, conf_dir: Path, seen: tuple[str, ...] = ()) -> list[dict]:
    """The YAML dicts of `name` and its `defaults` parents, parents first."""
    if name in seen:
        raise ConfigError(f"conf={name}: circular defaults: {' -> '.join((*seen, name))}")
    path = conf_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"conf={name}: no such config; available: "
                          f"{', '.join(available_configs(conf_dir))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parents = data.pop("defaults", []) or []
    if isinstance(parents, str):
        parents = [parents]
    chain: list[dict] = []
    for parent in parents:
        chain += _load_yaml_chain(str(parent), conf_dir, (*seen, name))
    chain.append(data)
    return chain


def _fields(schema: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every field of the schema, sections before their fields."""
    for f in dataclasses.fields(schema):
        yield f"{prefix}{f.name}", f
        if dataclasses.is_dataclass(value := getattr(schema, f.name)):
            yield from _fields(value, f"{prefix}{f.name}.")


def _first_leaf(key: str, value: Any) -> str:
    """`traner` with value {steps: 3} → `traner.steps`: name the key as the user wrote it."""
    while isinstance(value, dict) and len(value) == 1:
        (sub, value), = value.items()
        key = f"{key}.{sub}"
    return key


def _unknown_key_error(key: str, source: str, schema: Any) -> ConfigError:
    known = [key for key, _ in _fields(schema)]
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.75)
    if not close:  # a typo in the last part only: compare within the same section
        head, _, tail = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == head]
        close = [f"{head}.{m}" if head else m
                 for m in difflib.get_close_matches(tail, siblings, n=2, cutoff=0.5)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}' ({source}){hint}")


def _check_keys(data: Any, schema: Any, source: str, prefix: str = "", root: Any = None) -> None:
    """Reject keys the schema does not have, naming the full dotted key (and close matches
    among the keys of `root`, the whole schema)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(schema):
        return
    names = {f.name for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key_error(_first_leaf(full, value), source, root or schema)
        _check_keys(value, getattr(schema, key), source, full + ".", root or schema)


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return MISSING
        data = data[part]
    return data


def _parse_override(arg: str) -> tuple[str, Any]:
    if "=" not in arg:
        raise ConfigError(f"bad argument '{arg}': expected key=value (e.g. trainer.steps=10)")
    key, raw = arg.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_structured(schema: type[T], args: list[str], conf_dir: Path = CONF_DIR) -> T:
    """An instance of the dataclass `schema` from `conf=NAME` and `key.sub=value` arguments;
    ConfigError (one line) for an unknown config name, unknown key or wrong type."""
    name = None
    overrides: list[tuple[str, Any]] = []
    for arg in args:
        key, value = _parse_override(arg)
        if key == "conf":
            name = str(value)
        else:
            overrides.append((key, value))

    cfg = OmegaConf.structured(schema)
    # (where from, data, the replace=True mappings this layer sets as a whole)
    defaults = schema()
    replaceable = [key for key, f in _fields(defaults) if f.metadata.get("replace")]
    layers = [(f"conf/{name}.yaml", d, [k for k in replaceable if _lookup(d, k) is not MISSING])
              for d in (_load_yaml_chain(name, conf_dir) if name else [])]
    layers += [("command line", _nest(k, v), [k] if k in replaceable else [])
               for k, v in overrides]
    for source, data, replaced in layers:
        _check_keys(data, defaults, source)
        try:
            for key in replaced:
                OmegaConf.update(cfg, key, {}, merge=False)  # the layer's mapping replaces it
            cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        except (ValidationError, ConfigKeyError) as exc:
            key = getattr(exc, "full_key", None) or "?"
            msg = str(exc.msg).split("\n")[0]
            raise ConfigError(f"bad value for '{key}' ({source}): {msg}") from None
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad config ({source}): {exc}".split("\n")[0]) from None
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad config: {exc}".split("\n")[0]) from None
