"""Request bodies of both listeners: strict JSON objects of bounded size, or a one-line refusal.

Python's ``json`` accepts what an API should not: NaN and Infinity, integers of any length (a
5,000-digit one raises ValueError deep inside the decoder, a 20-digit one overflows SQLite
later), and nesting deep enough to raise RecursionError. Each of those is refused here as
:class:`InvalidArgument`, so no handler ever sees it and no caller ever gets a 500.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from vmreplica.errors import ConnectionFailed, InvalidArgument

MAX_JSON_BODY = 1 << 20  # JSON routes only; deltas and boot files are streamed
# A body from which no byte arrives for this long is a lost connection. A link that dies without
# a FIN or RST reaching us would otherwise hold the handler, and the replica's lock on the VM,
# until TCP keepalive gives up: two hours by Linux's defaults.
BODY_IDLE = 60.0
_MAX_INT_DIGITS = 19
_INT64 = 1 << 63


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise InvalidArgument(f"request body: integer {text[:24]}… is out of range")
    value = int(text)
    if not -_INT64 <= value < _INT64:
        raise InvalidArgument(f"request body: integer {value} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise InvalidArgument(f"request body: {name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidArgument(f"request body: number {text[:24]} is out of range")
    return value


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; an empty body is an empty object."""
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
        data = json.loads(
            text, parse_int=_bounded_int, parse_constant=_no_constant, parse_float=_finite_float
        )
    except UnicodeDecodeError:
        raise InvalidArgument("request body is not UTF-8") from None
    except RecursionError:
        raise InvalidArgument("request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError is one
        raise InvalidArgument(f"request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    try:  # a lone \ud800-\udfff escape decodes, then fails wherever the text is written
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("request body holds a lone UTF-16 surrogate: not text") from None
    return data


# A listener that checks bodies as they arrive (the Kerberos listener's MIC) puts its reader of
# the request's body here; handlers read bodies only through body_chunks().
BODY_KEY = "vmreplica.body"
ChunkSource = Callable[[int], AsyncIterator[bytes]]


def body_chunks(request: web.Request, size: int) -> AsyncIterator[bytes]:
    source: ChunkSource | None = request.get(BODY_KEY)
    return source(size) if source is not None else raw_chunks(request, size)


def raw_chunks(request: web.Request, size: int, idle: float = BODY_IDLE) -> AsyncIterator[bytes]:
    """The body as it arrives, up to ``size`` bytes at a time, given up after ``idle`` seconds
    without a byte."""
    return _idle_limited(request.content.iter_chunked(size), idle)


async def _idle_limited(chunks: AsyncIterator[bytes], idle: float) -> AsyncIterator[bytes]:
    # asyncio.timeout, not wait_for: wait_for runs each read as a task of its own, one more turn
    # of the event loop per chunk (thousands per delta), where this arms a timer in this task.
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ConnectionFailed(
                f"no data from the sender for {idle:g} s: the connection was lost"
            ) from None
        yield chunk


async def read_object(request: web.Request) -> dict[str, Any]:
    """Read at most :data:`MAX_JSON_BODY` bytes, without buffering more than that first."""
    if request.content_length is not None and request.content_length > MAX_JSON_BODY + 4096:
        raise InvalidArgument(f"request body is larger than {MAX_JSON_BODY} bytes")
    raw = bytearray()
    async for chunk in body_chunks(request, 64 * 1024):
        raw += chunk
        if len(raw) > MAX_JSON_BODY:
            raise InvalidArgument(f"request body is larger than {MAX_JSON_BODY} bytes")
    return parse_object(bytes(raw))
