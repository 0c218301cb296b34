"""Type checking: config values against type hints, mappings against dataclasses, component blocks
against their registered class's constructor, task names against their registry kind."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Literal, Union

from lavis.common.config.schema import CONTEXT_ARGS, ConfigError
from lavis.common.registry import did_you_mean, registry


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked (and int->float widened) against the annotation ``tp``."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(map(repr, args))}{did_you_mean(value, args)}"
            )
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return to_dataclass(tp, value, where)
    return value


def check_keys(keys, valid, where: str) -> None:
    for key in keys:
        if key not in valid:
            raise ConfigError(
                f"unknown key '{where}.{key}'{did_you_mean(key, valid)}; valid keys: {', '.join(sorted(valid)) or 'none'}"
            )


def to_dataclass(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, failing on unknown, missing or mistyped keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(data, fields, where)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = check_type(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key '{where}.{name}'")
    return cls(**values)


def constructor_args(cls, kind: str) -> dict[str, inspect.Parameter]:
    """The user-settable constructor arguments of a registered class (context args excluded)."""
    target = cls.__init__ if inspect.isclass(cls) else cls
    params = inspect.signature(target).parameters
    skip = {"self", *CONTEXT_ARGS.get(kind, ())}
    return {
        name: p
        for name, p in params.items()
        if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_params(cls, kind: str, params: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a component block's keys and types against ``cls``'s constructor."""
    accepted = constructor_args(cls, kind)
    check_keys(params, accepted, where)
    target = cls.__init__ if inspect.isclass(cls) else cls
    hints = typing.get_type_hints(target)
    checked = {}
    for name, p in accepted.items():
        if name in params:
            checked[name] = check_type(params[name], hints.get(name, Any), f"{where}.{name}")
        elif p.default is inspect.Parameter.empty:
            raise ConfigError(f"missing key '{where}.{name}' (required by {kind} '{cls.registry_name}')")
    return checked


def eval_task(name: Any, where: str):
    """The evaluation task registered as ``name`` (kind ``eval_task``); a training task named there is an
    error saying so, any other unknown name the registry's "did you mean"."""
    if name not in registry.list("eval_task") and name in registry.list("task"):
        raise ConfigError(f"{where}: '{name}' is a training task; evaluation tasks: {', '.join(registry.list('eval_task'))}")
    return registry.get("eval_task", name)


def training_task(name: Any, where: str):
    """The training task registered as ``name`` (kind ``task``); an evaluation task named there is an
    error saying so, any other unknown name the registry's "did you mean"."""
    if name not in registry.list("task") and name in registry.list("eval_task"):
        raise ConfigError(
            f"{where}: '{name}' is an evaluation task; name it under 'evaluation:' (training tasks: "
            f"{', '.join(registry.list('task'))})"
        )
    return registry.get("task", name)
