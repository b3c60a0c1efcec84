"""Typed reads of JSON arguments: a wrong type is the caller's error, reported as one line."""

from __future__ import annotations

import math
from typing import Any

from vmreplica.errors import InvalidArgument


def req_str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        raise InvalidArgument(f"missing or invalid argument {key!r}: a string is required")
    return value


def opt_str(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"invalid argument {key!r}: a string is required")
    return value


_INT64 = 1 << 63


def opt_int(args: dict[str, Any], key: str) -> int | None:
    value = args.get(key)
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not -_INT64 <= value < _INT64
    ):
        raise InvalidArgument(f"invalid argument {key!r}: an integer is required")
    return value


def opt_bool(args: dict[str, Any], key: str) -> bool | None:
    value = args.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"invalid argument {key!r}: true or false is required")
    return value


def opt_float(args: dict[str, Any], key: str) -> float | None:
    value = args.get(key)
    if value is not None and (
        not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
    ):
        raise InvalidArgument(f"invalid argument {key!r}: a finite number is required")
    return None if value is None else float(value)


def str_list(args: dict[str, Any], key: str) -> list[str]:
    value = args.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"invalid argument {key!r}: a list of strings is required")
    return value


def dict_list(args: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = args.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidArgument(f"invalid argument {key!r}: a list of objects is required")
    return value
