"""``--set KEY=VALUE``: override fields of a frozen config dataclass from the command line.

VALUE is parsed as JSON (``epochs=6``, ``lrs=[1e-3, 3e-3]``, ``'settings=[[64, 8], [64, 16]]'``,
``device="cpu"``; a bare word that is not JSON is taken as a string: ``filler=zero``). The value is checked
against the field's type annotation (int, float, str, bool, Optional[...], Union[...], Tuple[..., ...],
nested tuples and Dict[str, ...]); an unknown key or a value of the wrong type raises ``ValueError`` naming
the key. A dictionary field is *merged* over the config's value, key by key and one level down
(``mixer_kwargs={"palimpsa": {"expand_v": 2}}`` changes Palimpsa's ``expand_v`` and keeps its other
options and every other model's); a key set to ``null`` removes it.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, TypeVar

C = TypeVar("C")


def parse_assignments(items: Sequence[str]) -> Dict[str, Any]:
    """``["a=1", "b=[1, 2]"]`` -> ``{"a": 1, "b": [1, 2]}`` (JSON values; a bare word is a string)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            if not text.strip() or any(c in text for c in "[]{}\","):
                raise ValueError(f"--set {key}: {text!r} is not valid JSON") from None
            value = text.strip()
        out[key] = value
    return out


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as an instance of ``annotation`` (lists become tuples); ``ValueError`` naming ``key`` if not."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{key}: {value!r} is not allowed")
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{key}: expected a list of {len(args)} items, got {value!r}")
        return tuple(coerce(key, v, a) for v, a in zip(value, args))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a JSON object, got {value!r}")
        kt, vt = args if args else (str, Any)
        return {coerce(key, k, kt): (None if v is None else coerce(f"{key}.{k}", v, vt)) for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    if annotation is Any:
        return value
    raise ValueError(f"{key}: cannot be set from the command line")


def apply_overrides(cfg: C, items: Sequence[str], frozen: Sequence[str] = ("name",)) -> C:
    """``cfg`` (a dataclass) with the ``KEY=VALUE`` assignments of ``items`` applied and type-checked.

    Keys in ``frozen`` cannot be set. Raises ``ValueError`` naming the first bad key."""
    values = parse_assignments(items)
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes: Dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields or key in frozen:
            settable = ", ".join(sorted(f for f in fields if f not in frozen))
            raise ValueError(f"--set {key}: unknown key; settable keys: {settable}")
        changes[key] = coerce(key, value, hints[key])
        if isinstance(changes[key], dict) and isinstance(getattr(cfg, key), dict):
            changes[key] = merge_dicts(getattr(cfg, key), changes[key])
    return dataclasses.replace(cfg, **changes)


def merge_dicts(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """``update`` merged over ``base`` (new dictionaries, neither argument changed): a key whose both values
    are dictionaries is merged one level down, any other key replaced; a value ``None`` removes the key."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in update.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            inner = dict(out[k])
            for k2, v2 in v.items():
                if v2 is None:
                    inner.pop(k2, None)
                else:
                    inner[k2] = v2
            out[k] = inner
        else:
            out[k] = v
    return out


def config_for_run(args: Any, config_from_args: Callable[[Any], C], device: Optional[str] = None) -> C:
    """The checks every experiment command makes before any work: ``--out`` is a writable folder location,
    the config (with its ``--set`` overrides) is valid, and a CUDA ``device`` asked for exists; each failure
    is a :class:`metaplastic.errors.UserError` naming it."""
    from metaplastic.errors import UserError
    from metaplastic.safe_io import check_output_location
    check_output_location(args.out, what="--out", kind="dir")
    try:
        cfg = config_from_args(args)
    except ImportError as exc:
        raise UserError(f"the mixers of metaplastic.models are not available: {exc}") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if device and device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} was asked for but torch sees no CUDA device")
    return cfg
