"""Typed configuration: pydantic models loaded from YAML plus ``key=value`` command-line overrides.

A job's config is a tree of pydantic models deriving from :class:`StrictConfig`, every field
with a default that runs on a laptop. ``load_config`` reads an optional YAML file, applies
overrides such as ``trainer.lr=1e-5`` or ``output_dir=/tmp/run`` (values parsed as YAML, so
``3``, ``0.5``, ``true``, ``[1, 2]`` and ``null`` mean what they look like), checks every key
against the schema and validates the result. The file and then each override are merged key by
key over the defaults: ``trainer.lr=1e-5`` changes ``lr`` alone, and a mapping given for a
section (``trainer={lr: 1e-5}``) updates the section rather than replacing it::

    cfg = load_config(JobConfig, "examples/grpo.yaml", ["trainer.lr=1e-5", "output_dir=out/run1"])

Unknown keys and ill-typed values raise :class:`ConfigError` naming the dotted key, with the
valid keys at that level (and the closest one) for a typo.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what would be valid."""


class StrictConfig(BaseModel):
    """Base for config sections: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: ``1e-5`` is a float and only ``true``/``false`` are booleans.

    PyYAML follows YAML 1.1, where ``lr: 1e-5`` is the *string* "1e-5" and ``on``/``no`` are
    booleans, both classic config-file traps.
    """


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """Parse one override value the way it would read in the YAML file."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse value {text!r}: {err}") from None


def _sub_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """``(model, is_mapping)`` for a field whose keys can be descended into, else ``(None, False)``.

    ``Sub`` and ``Sub | None`` descend into ``Sub``; ``dict[str, Sub]`` takes free keys whose
    values are ``Sub``; ``dict[str, X]`` takes free keys with no further checking.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _sub_model(models[0]) if len(models) == 1 else (None, False)
    if origin is dict:
        value = typing.get_args(annotation)[1] if typing.get_args(annotation) else Any
        return (value if isinstance(value, type) and issubclass(value, BaseModel) else None), True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _unknown_key(key: str, prefix: str, model: type[BaseModel]) -> ConfigError:
    valid = list(model.model_fields)
    where = f"under {prefix!r}" if prefix else "at the top level"
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r}{hint}; valid keys {where}: {', '.join(valid)}")


def _explicit(value: Any) -> Any:
    """A field default as plain data, keeping only what it sets explicitly.

    Sub-models contribute just their explicitly set fields, so class-level defaults (and
    derived values computed by validators) are recomputed when the merged data is validated.
    """
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    if isinstance(value, dict):
        return {key: _explicit(entry) for key, entry in value.items()}
    return copy.deepcopy(value)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        previous = merged.get(key)
        merged[key] = (
            _deep_merge(previous, value) if isinstance(previous, dict) and isinstance(value, dict) else value
        )
    return merged


def _merge_section(model: type[BaseModel], base: dict[str, Any], update: dict[str, Any], prefix: str) -> dict:
    """``update`` merged key by key over ``base`` (the data of one ``model`` section so far).

    A section the update reaches into starts from its field default, so ``critic.lr=1e-5``
    changes only ``lr`` even when the ``critic`` default is a customised instance or a dict.
    Unknown keys raise :class:`ConfigError`.
    """
    merged = dict(base)
    for key, value in update.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            raise _unknown_key(dotted, prefix, model)
        sub, is_mapping = _sub_model(field.annotation)
        if not isinstance(value, dict) or (sub is None and not is_mapping):
            merged[key] = value  # a value, or a type error pydantic will report with its location
            continue
        current = merged[key] if key in merged else _explicit(field.get_default(call_default_factory=True))
        current = current if isinstance(current, dict) else {}
        if not is_mapping:
            merged[key] = _merge_section(sub, current, value, dotted)
        elif sub is None:
            merged[key] = _deep_merge(current, value)
        else:
            entries = merged[key] = dict(current)
            for name, entry in value.items():
                previous = entries.get(name)
                entries[name] = (
                    _merge_section(
                        sub, previous if isinstance(previous, dict) else {}, entry, f"{dotted}.{name}"
                    )
                    if isinstance(entry, dict)
                    else entry
                )
    return merged


def _override_as_dict(override: str) -> dict[str, Any]:
    """``"a.b=1"`` as ``{"a": {"b": 1}}``."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. trainer.lr=1e-5)")
    if not all(parts):
        raise ConfigError(f"override key {key!r} has an empty part; write e.g. trainer.lr=1e-5")
    nested: Any = parse_value(text)
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_YamlLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys at the top, got {type(data).__name__}")
    return data


def _validation_message(err: pydantic.ValidationError) -> str:
    lines = []
    for error in err.errors():
        key = ".".join(str(part) for part in error["loc"]) or "<top level>"
        got = repr(error["input"])
        lines.append(f"{key}: {error['msg']} (got {got if len(got) <= 120 else got[:117] + '...'})")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config_data(
    model_cls: type[BaseModel], path: str | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The merged data :func:`load_config` would validate, for callers that add to it first.

    Reads ``path`` with the YAML 1.2 rules above and applies ``overrides``; every key is checked
    against ``model_cls`` (:class:`ConfigError` for an unknown one), values are not validated yet.
    """
    data = _merge_section(model_cls, {}, _read_yaml(path) if path is not None else {}, "")
    for override in overrides:
        data = _merge_section(model_cls, data, _override_as_dict(override), "")
    return data


def load_config(model_cls: type[M], path: str | None = None, overrides: Sequence[str] = ()) -> M:
    """Build ``model_cls`` from the YAML file ``path`` (optional) and ``key=value`` overrides.

    Keys absent from both keep their defaults. Raises :class:`ConfigError` for an unknown key,
    a malformed override or a value of the wrong type.
    """
    data = load_config_data(model_cls, path, overrides)
    try:
        return model_cls.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(_validation_message(err)) from None


def dump_config(cfg: BaseModel, path: str) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal config."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
