"""JSON round trip of a ``LoadPlan``.

A plan is computed once on the driver and shipped to every rank, saved by ``meshload plan --json``,
and read back for inspection or to load later. The codec is driven by the dataclasses' type hints,
so tuples come back as tuples and nested specs as their frozen classes; a value of the wrong JSON
type is refused (a plan may come from a file someone else wrote); a plan read back is validated
again before use (``planning.validate``, which also checks every name in it against
``planning.confinement``).

Pure; no I/O.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from functools import cache

from planning.errors import PlanError
from planning.plan import PLAN_FORMAT_VERSION, LoadPlan
from planning.validate import validate_plan


@cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _encode(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(tp, value):
    if value is None:
        return None
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
            if not (tp is float and isinstance(value, int) and not isinstance(value, bool)):
                raise PlanError(f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if tp is dict and not isinstance(value, dict):
        raise PlanError(f"expected a JSON object, got {type(value).__name__}")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _decode(options[0], value)
        return value  # e.g. int | str: JSON already carries the right type
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PlanError(f"expected an object for {tp.__name__}, got {type(value).__name__}")
        hints = _hints(tp)
        return tp(**{f.name: _decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.init and f.name in value})
    if origin in (tuple, list, dict) and not isinstance(value, dict if origin is dict else list):
        raise PlanError(f"expected a JSON {'object' if origin is dict else 'list'}, got {type(value).__name__}")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        if len(value) != len(args):
            raise PlanError(f"expected {len(args)} values, got {len(value)}")
        return tuple(_decode(a, v) for a, v in zip(args, value))
    if origin is dict:
        key_t, val_t = args
        return {(int(k) if key_t is int else k): _decode(val_t, v) for k, v in value.items()}
    if origin is list:
        return [_decode(args[0], v) for v in value]
    return value


def plan_to_json(plan: LoadPlan, *, indent: int | None = None) -> str:
    """The plan as JSON text (what ``plan_from_json`` reads back)."""
    return json.dumps(_encode(plan), indent=indent, sort_keys=False)


def plan_from_json(text: str) -> LoadPlan:
    """A plan read back from JSON, its types and its version checked, then validated (``planning.validate``)."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"a plan must be JSON: {exc}") from None
    version = data.get("version") if isinstance(data, dict) else None
    if version != PLAN_FORMAT_VERSION:
        raise PlanError(f"plan format version {version!r} is not supported (expected {PLAN_FORMAT_VERSION})")
    try:
        plan = _decode(LoadPlan, data)
    except PlanError as exc:
        raise PlanError(f"malformed plan: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise PlanError(f"malformed plan: {type(exc).__name__}: {exc}") from None
    validate_plan(plan)
    return plan
