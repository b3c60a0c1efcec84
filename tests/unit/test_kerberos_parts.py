"""Pure parts of Kerberos support: the body trailer that binds a call to its MIC, principal names,
how the library's failures become one-line reasons, keytab checks, host.toml and ``host init``.
The exchange itself runs against a real KDC in tests/integration/test_kerberos.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmreplica._internal.config import KerberosKeys, load_host_config
from vmreplica._internal.drivers.qemu import tls_creds
from vmreplica._internal.ports.hypervisor import NbdPsk
from vmreplica._internal.transport import gss, signed
from vmreplica.errors import AccessDenied, InvalidArgument


def _mic(digest: bytes) -> bytes:
    return b"M" * 28 + digest[:4]  # stands in for a GSS MIC: any bytes the checker recognises


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _send_and_receive(body: bytes, chunk: int, tamper: int | None = None) -> bytes:
    sent = b"".join([c async for c in signed.signed_body(_chunks(body, 1000), _mic)])
    if tamper is not None:
        sent = sent[:tamper] + bytes([sent[tamper] ^ 1]) + sent[tamper + 1 :]
    checked: list[bytes] = []

    def check(digest: bytes, mic: bytes) -> None:
        checked.append(digest)
        if mic != _mic(digest):
            raise AccessDenied("tampered body: the GSS MIC does not verify")

    out = b"".join([c async for c in signed.verified_body(_chunks(sent, chunk), check)])
    assert len(checked) == 1
    return out


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 70_000])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 65536])
def test_a_signed_body_arrives_whole_and_checked(size: int, chunk: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert asyncio.run(_send_and_receive(body, chunk)) == body


@pytest.mark.parametrize("where", [0, 5000, 9999])
def test_a_tampered_body_is_refused_before_its_end_is_released(where: int) -> None:
    body = b"d" * 10_000
    released: list[bytes] = []

    async def run() -> None:
        sent = b"".join([c async for c in signed.signed_body(body, _mic)])
        sent = sent[:where] + b"X" + sent[where + 1 :]

        def check(digest: bytes, mic: bytes) -> None:
            if mic != _mic(digest):
                raise AccessDenied("tampered body")

        async for piece in signed.verified_body(_chunks(sent, 4096), check):
            released.append(piece)

    with pytest.raises(AccessDenied, match="tampered body"):
        asyncio.run(run())
    # Whatever was handed on, the last bytes (and so a delta's closing manifest) never were.
    assert sum(map(len, released)) <= len(body) - (signed.TRAILER_MAX - 36)


@pytest.mark.parametrize(
    "sent", [b"", b"abc", b"\x00\x00\x00\x00", b"x" * 10 + b"\xff\xff\xff\xff"]
)
def test_a_missing_or_oversized_trailer_is_refused(sent: bytes) -> None:
    async def run() -> None:
        async for _ in signed.verified_body(_chunks(sent, 3), lambda d, m: None):
            pass

    with pytest.raises(AccessDenied, match="trailer is missing or truncated"):
        asyncio.run(run())


def test_messages_bind_method_route_and_status() -> None:
    digest = b"\x01" * 32
    assert signed.request_message("POST", "/a", digest) != signed.request_message(
        "POST", "/b", digest
    )
    assert signed.answer_message(200, b"{}") != signed.answer_message(403, b"{}")
    with pytest.raises(AccessDenied, match="malformed"):
        signed.unb64("not base64!", "token")


def test_principal_names() -> None:
    p = gss.Principal.parse("host/VMHost1.Contoso.com@CONTOSO.COM")
    assert (p.service, p.host, p.realm) == ("host", "vmhost1.contoso.com", "CONTOSO.COM")
    assert str(p) == "host/vmhost1.contoso.com@CONTOSO.COM"
    user = gss.Principal.parse("alice@CONTOSO.COM")
    assert (user.service, user.host, user.realm) == (None, "alice", "CONTOSO.COM")


@pytest.mark.parametrize(
    ("library", "reason"),
    [
        ("Clock skew too great", "clock skew:"),
        ("Ticket expired", "expired ticket:"),
        ("Request is a replay", "replayed authenticator:"),
        ("No key table entry found for HTTP/x@R", "Kerberos: this host has no key"),
        ("Decrypt integrity check failed", "Kerberos: the sender's token was refused"),
    ],
)
def test_acceptor_failures_get_their_own_reason(library: str, reason: str) -> None:
    assert gss._server_reason(library).startswith(reason)


@pytest.mark.parametrize(
    ("library", "reason"),
    [
        ("Client 'host/a@R' not found in Kerberos database", "unknown principal:"),
        ("Clock skew too great while getting initial credentials", "clock skew:"),
        ("Ticket expired", "expired ticket:"),
    ],
)
def test_initiator_failures_get_their_own_reason(library: str, reason: str) -> None:
    assert gss._client_reason("host/a@R", "host/b", library).startswith(reason)


def test_a_missing_or_unreadable_keytab_is_named(tmp_path: Path) -> None:
    with pytest.raises(AccessDenied, match=r"missing or unreadable keytab .*missing"):
        gss.check_keytab(tmp_path / "missing")
    with pytest.raises(AccessDenied, match="missing or unreadable keytab"):
        gss.check_keytab(tmp_path)  # a directory: root reads any file, but not this one


def test_psk_files_have_the_layout_qemu_expects(tmp_path: Path) -> None:
    psk = NbdPsk("vmr-0123", bytes(range(32)))
    server = tls_creds.tls_creds(tmp_path / "s", psk, "server")
    client = tls_creds.tls_creds(tmp_path / "c", psk, "client")
    for creds in (server, client):
        keys = creds.directory / "keys.psk"
        assert keys.read_text() == f"vmr-0123:{bytes(range(32)).hex()}\n"
        assert keys.stat().st_mode & 0o777 == 0o600
    assert ",endpoint=client,username=vmr-0123,priority=NORMAL:" in client.options("client")
    assert "username" not in server.options("server")


def _write_host_toml(path: Path, extra: str) -> Path:
    path.write_text(
        'name = "h1.example.com"\nstate_dir = "/x"\nmgmt_listen = "127.0.0.1:1"\n'
        '[tls]\nca = "/c"\ncert = "/c"\nkey = "/k"\n' + extra
    )
    return path


def test_host_toml_kerberos_table(tmp_path: Path) -> None:
    defaults = load_host_config(_write_host_toml(tmp_path / "a.toml", ""))
    assert defaults.kerberos_keys == KerberosKeys(Path("/etc/krb5.keytab"), "host/h1.example.com")
    given = load_host_config(
        _write_host_toml(
            tmp_path / "b.toml", '[kerberos]\nkeytab = "/k.keytab"\nprincipal = "HTTP/h1"\n'
        )
    )
    assert given.kerberos_keys == KerberosKeys(Path("/k.keytab"), "HTTP/h1")
    with pytest.raises(InvalidArgument, match=r"\[kerberos\] needs keytab and principal"):
        load_host_config(_write_host_toml(tmp_path / "c.toml", "[kerberos]\nkeytab = 3\n"))


def test_host_init_writes_keytab_and_principal(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    base = [sys.executable, "-m", "vmreplica", "host", "init", "--name", "h1.example.com",
            "--state-dir", str(tmp_path / "s"), "--mgmt-listen", "127.0.0.1:1", "--socket",
            str(tmp_path / "a.sock"), "--ca", str(tmp_path / "ca.pem"), "--cert",
            str(tmp_path / "cert.pem"), "--key", str(tmp_path / "key.pem")]  # fmt: skip
    out = tmp_path / "host.toml"
    done = subprocess.run(
        [*base, "--keytab", str(tmp_path / "h1.keytab"), "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = tomllib.loads(out.read_text())["kerberos"]
    assert table == {"keytab": str(tmp_path / "h1.keytab"), "principal": "host/h1.example.com"}
    bad = subprocess.run(
        [*base, "--principal", "host/with space", "--out", str(tmp_path / "bad.toml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "invalid Kerberos principal" in bad.stderr and not (tmp_path / "bad.toml").exists()


def _wrap(data: bytes) -> bytes:
    return b"W" + bytes(b ^ 0x5A for b in data)  # stands in for a GSS wrap token


def _unwrap(token: bytes) -> bytes:
    if not token.startswith(b"W"):
        raise AccessDenied("tampered body: a sealed frame does not unwrap")
    return bytes(b ^ 0x5A for b in token[1:])


def _check(digest: bytes, mic: bytes) -> None:
    if mic != _mic(digest):
        raise AccessDenied("tampered body: the GSS MIC does not verify")


async def _sealed(body: bytes) -> bytes:
    return b"".join([c async for c in signed.sealed_body(_chunks(body, 300_000), _wrap, _mic)])


async def _unsealed(sent: bytes, chunk: int) -> bytes:
    return b"".join([c async for c in signed.unsealed_body(_chunks(sent, chunk), _unwrap, _check)])


@pytest.mark.parametrize("size", [0, 1, signed.SEAL_PIECE, 3 * signed.SEAL_PIECE + 17])
def test_a_sealed_body_arrives_whole_and_never_in_clear(size: int) -> None:
    body = bytes(range(251)) * (size // 251) + b"q" * (size % 251)
    sent = asyncio.run(_sealed(body))
    if size >= 251:
        assert body[:251] not in sent  # every byte of the body went through wrap
    assert asyncio.run(_unsealed(sent, 65536)) == body


def test_a_sealed_body_with_a_frame_dropped_moved_or_cut_is_refused() -> None:
    body = b"".join(bytes([i]) * signed.SEAL_PIECE for i in range(3))
    sent = asyncio.run(_sealed(body))
    frame = 4 + 1 + signed.SEAL_PIECE
    frames = [sent[i * frame : (i + 1) * frame] for i in range(3)]
    end = sent[3 * frame :]
    cases = {
        "dropped": frames[0] + frames[2] + end,
        "moved": frames[1] + frames[0] + frames[2] + end,
        "repeated": frames[0] + frames[0] + frames[1] + frames[2] + end,
        "cut before the end": b"".join(frames),
        "cut in a frame": sent[: frame + 100],
        "no trailer": b"".join(frames) + b"\0\0\0\0",
    }
    for what, tampered in cases.items():
        try:
            asyncio.run(_unsealed(tampered, 65536))
        except AccessDenied as e:
            assert e.message.startswith("tampered body"), (what, e.message)
        else:
            pytest.fail(f"a sealed body {what} was accepted")


def test_a_sealed_answer_keeps_its_status() -> None:
    sealed = signed.seal_answer(200, b'{"result": {}}', _wrap)
    assert signed.open_answer(200, sealed, _unwrap) == b'{"result": {}}'
    with pytest.raises(AccessDenied, match="tampered answer"):
        signed.open_answer(403, sealed, _unwrap)
