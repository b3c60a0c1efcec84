"""Typed reads of JSON objects that come from a peer: every refusal is one line naming the field,
and nothing a peer sends reaches the engine unchecked (transport/protocol.py)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from vmreplica.errors import InvalidArgument

HEX64 = re.compile(r"[0-9a-f]{64}")  # a BLAKE3 or SHA-256 digest in hex

MAX_TEXT = 4096
INT64 = 1 << 63


class Body:
    """Typed reads of one JSON object; every refusal names the field."""

    def __init__(self, data: Mapping[str, Any], what: str) -> None:
        self._data = data
        self._what = what

    def _bad(self, key: str, expected: str) -> InvalidArgument:
        return InvalidArgument(f"{self._what}: field {key!r} must be {expected}")

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def string(self, key: str, max_len: int = MAX_TEXT, optional: bool = False) -> str:
        value = self._data.get(key)
        if value is None and optional:
            return ""
        if not isinstance(value, str) or len(value) > max_len or not value.isprintable():
            raise self._bad(key, f"a line of at most {max_len} printable characters")
        return value

    def opt_string(self, key: str, max_len: int = MAX_TEXT) -> str | None:
        return self.string(key, max_len) if self.has(key) else None

    def integer(self, key: str, low: int = 0, high: int = INT64 - 1) -> int:
        value = self._data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self._bad(key, f"an integer from {low} to {high}")
        return value

    def opt_integer(self, key: str, low: int = 0, high: int = INT64 - 1) -> int | None:
        return self.integer(key, low, high) if self.has(key) else None

    def boolean(self, key: str, default: bool | None = None) -> bool:
        value = self._data.get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def vm_id(self, key: str = "vm_id") -> str:
        return parse_vm_id(self._data.get(key), f"{self._what}: field {key!r}")

    def sub(self, key: str, optional: bool = False) -> Body | None:
        value = self._data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self._bad(key, "an object")
        return Body(value, f"{self._what}.{key}")

    def raw(self, key: str) -> object:
        return self._data.get(key)

    def int_list(self, key: str, low: int, high: int, max_items: int) -> tuple[int, ...]:
        value = self._data.get(key)
        if (
            not isinstance(value, list)
            or not 1 <= len(value) <= max_items
            or not all(
                isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in value
            )
        ):
            raise self._bad(key, f"a list of 1 to {max_items} integers from {low} to {high}")
        return tuple(value)


def parse_vm_id(value: object, what: str = "vm_id") -> str:
    """A VM id as the peer sent it, only if it is a canonical (lower-case, hyphenated) UUID."""
    if isinstance(value, str) and len(value) == 36:
        try:
            if str(uuid.UUID(value)) == value:
                return value
        except ValueError:
            pass
    raise InvalidArgument(f"{what} must be a VM id (a canonical UUID)")


def parse_port(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise InvalidArgument(f"{what} must be a port from 1 to 65535")
    return value


MAX_DEFINITION = 256 << 10  # bytes of a domain's XML (definition.MAX_DEFINITION)


def parse_definition(value: object) -> str | None:
    """A domain's XML: text of at most MAX_DEFINITION bytes, no control characters but line
    ends and tabs (its content is checked by the replica, definition.check)."""
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or len(value.encode("utf-8", errors="replace")) > MAX_DEFINITION
        or not value.replace("\n", "").replace("\r", "").replace("\t", "").isprintable()
    ):
        raise InvalidArgument(
            f"enable: field 'definition' must be domain XML of at most {MAX_DEFINITION} bytes"
        )
    return value
