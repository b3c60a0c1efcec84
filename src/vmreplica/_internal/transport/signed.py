"""How a call on the Kerberos listener is bound to its SPNEGO exchange (see transport/gss.py).

Each call is two HTTP requests: ``negotiate`` carries ``Authorization: Negotiate <token>`` and is
answered with the replica's reply token (mutual authentication) and a one-time context id; the
call itself names that id in :data:`CONTEXT_HEADER`. Its body ends with a trailer, the GSS MIC of
the body's blake3 digest (so a delta's own blake3 manifest is covered too) with the method and
route, then the MIC's length in 4 bytes. The answer carries the MIC of its status and body's
digest in :data:`MIC_HEADER`. A receiver releases the last bytes of a body only once the MIC
verified, so a handler never reaches the end of a tampered body.

With ``--encrypt true`` (:data:`PROTECTION_HEADER` set to :data:`SEALED`) the body travels as
frames instead, each a GSS wrap token with confidentiality (4-byte length, token) of at most
:data:`SEAL_PIECE` bytes of the body, then a zero length and the same trailer, which a receiver
checks before the body ends: a frame dropped, repeated or moved changes the digest. The answer
is then one wrap token of its status and body.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterable, AsyncIterator, Callable

import blake3

from vmreplica.errors import AccessDenied

CONTEXT_HEADER = "X-Vmr-Gss-Context"
MIC_HEADER = "X-Vmr-Mic"
PROTECTION_HEADER = "X-Vmr-Protection"
SEALED = "gss-wrap"
TRAILER_MAX = 4096  # a Kerberos MIC is 28 to 40 bytes; anything longer is not one
SEAL_PIECE = 1 << 20
_SEALED_FRAME_MAX = SEAL_PIECE + 4096  # a wrap token adds a header, padding and a checksum
_OFFLOAD = 1 << 16  # pieces at least this large are hashed or wrapped off the event loop


async def _off_loop(fn: Callable[[bytes], object], data: bytes) -> object:
    """blake3 and GSSAPI release the GIL: large pieces go to a thread, the loop stays free."""
    return await asyncio.to_thread(fn, data) if len(data) >= _OFFLOAD else fn(data)


async def _pieces(body: bytes | AsyncIterable[bytes], size: int) -> AsyncIterator[bytes]:
    if isinstance(body, bytes):
        for i in range(0, len(body), size):
            yield body[i : i + size]
        return
    async for chunk in body:
        for i in range(0, len(chunk), size):
            yield chunk[i : i + size]


def request_message(method: str, path_qs: str, digest: bytes) -> bytes:
    return b"vmreplica request\0" + f"{method} {path_qs}".encode() + b"\0" + digest


def answer_message(status: int, body: bytes) -> bytes:
    return b"vmreplica answer\0" + str(status).encode() + b"\0" + blake3.blake3(body).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise AccessDenied(f"Kerberos: malformed {what}") from None


async def signed_body(
    body: bytes | AsyncIterable[bytes], sign: Callable[[bytes], bytes]
) -> AsyncIterator[bytes]:
    """The sender's side: the body as it goes, then its trailer."""
    hasher = blake3.blake3()
    async for piece in _pieces(body, 1 << 22):
        await _off_loop(hasher.update, piece)
        yield piece
    mic = sign(hasher.digest())
    yield mic + len(mic).to_bytes(4, "big")


async def verified_body(
    chunks: AsyncIterable[bytes], check: Callable[[bytes, bytes], None]
) -> AsyncIterator[bytes]:
    """The receiver's side: the body without its trailer; the last :data:`TRAILER_MAX` bytes are
    held back until ``check(digest, mic)`` passed (it raises on a bad MIC)."""
    hasher = blake3.blake3()
    held = b""
    async for chunk in chunks:
        held += chunk
        if len(held) > TRAILER_MAX:
            out, held = held[:-TRAILER_MAX], held[-TRAILER_MAX:]
            await _off_loop(hasher.update, out)
            yield out
    size = int.from_bytes(held[-4:], "big") if len(held) >= 4 else -1
    if not 0 < size <= len(held) - 4:
        raise AccessDenied("tampered body: the request's GSS MIC trailer is missing or truncated")
    tail, mic = held[: -4 - size], held[-4 - size : -4]
    hasher.update(tail)
    check(hasher.digest(), mic)
    if tail:
        yield tail


async def sealed_body(
    body: bytes | AsyncIterable[bytes], wrap: Callable[[bytes], bytes],
    sign: Callable[[bytes], bytes],
) -> AsyncIterator[bytes]:  # fmt: skip
    """The sender's side with --encrypt: wrap frames, the end mark, the trailer."""
    hasher = blake3.blake3()
    async for piece in _pieces(body, SEAL_PIECE):
        await _off_loop(hasher.update, piece)
        token = await _off_loop(wrap, piece)
        assert isinstance(token, bytes)
        yield len(token).to_bytes(4, "big") + token
    mic = sign(hasher.digest())
    yield b"\0\0\0\0" + mic + len(mic).to_bytes(4, "big")


class _Reader:
    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._it, self._buf = aiter(chunks), bytearray()

    async def read(self, n: int) -> bytes:
        """Exactly n bytes, or a refusal: a sealed body never just stops."""
        while len(self._buf) < n:
            try:
                self._buf += await anext(self._it)
            except StopAsyncIteration:
                raise AccessDenied("tampered body: the sealed request is truncated") from None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def rest(self, limit: int) -> bytes:
        async for chunk in self._it:
            self._buf += chunk
            if len(self._buf) > limit:
                break
        out = bytes(self._buf)
        self._buf.clear()
        return out


async def unsealed_body(
    chunks: AsyncIterable[bytes], unwrap: Callable[[bytes], bytes],
    check: Callable[[bytes, bytes], None],
) -> AsyncIterator[bytes]:  # fmt: skip
    """The receiver's side with --encrypt: the plaintext, frame by frame; the end mark and a
    trailer that verifies, or a refusal, before the body ends."""
    reader, hasher = _Reader(chunks), blake3.blake3()
    while size := int.from_bytes(await reader.read(4), "big"):
        if size > _SEALED_FRAME_MAX:
            raise AccessDenied("tampered body: a sealed frame is larger than any sender makes")
        plain = await _off_loop(unwrap, await reader.read(size))
        assert isinstance(plain, bytes)
        await _off_loop(hasher.update, plain)
        yield plain
    trailer = await reader.rest(TRAILER_MAX)
    size = int.from_bytes(trailer[-4:], "big") if len(trailer) >= 4 else -1
    if size != len(trailer) - 4 or size <= 0:
        raise AccessDenied("tampered body: the sealed request's trailer is missing or malformed")
    check(hasher.digest(), trailer[:-4])


def seal_answer(status: int, body: bytes, wrap: Callable[[bytes], bytes]) -> bytes:
    return wrap(str(status).encode() + b"\0" + body)


def open_answer(status: int, sealed: bytes, unwrap: Callable[[bytes], bytes]) -> bytes:
    """The body of a sealed answer, whose status must be the one it was sent with."""
    plain = unwrap(sealed)
    sent_status, _, body = plain.partition(b"\0")
    if sent_status != str(status).encode():
        raise AccessDenied("tampered answer: its HTTP status is not the one the replica sealed")
    return body
