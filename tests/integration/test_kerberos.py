"""Kerberos authentication over HTTP against a real MIT KDC (tests/kdc.py): settings, the SPNEGO
exchange with mutual authentication, GSS MICs on bodies and answers, a full replication scenario,
and every refusal, each with its own one-line reason."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import blake3
import pytest

from tests.integration.replication_env import Pair, verified_equal
from tests.integration.test_failover import reads, state
from tests.integration.test_server_auth import one_line_error
from tests.kdc import Realm, use_kerberos
from tests.localcluster import Cluster, free_port
from vmreplica._internal.config import KerberosKeys, PeerCredentials, TlsFiles
from vmreplica._internal.transport import gss, signed
from vmreplica._internal.transport import protocol as p
from vmreplica._internal.transport.peer import KERBEROS, Peer, PeerAddress, open_peer
from vmreplica.errors import AccessDenied

REPLICA, PRIMARY, OTHER = "vmhost1", "vmhost2", "vmhost3"
# Preloaded rather than run through faketime(1), which would stand between the test and the
# agent's process (a signal to faketime does not reach the agent).
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@pytest.fixture(scope="module")
def realm() -> Iterator[Realm]:
    r = Realm.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def krb(realm: Realm) -> Iterator[Cluster]:
    """Three agents with keytabs of the realm; vmhost1 accepts Kerberos from vmhost2 only."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in realm.env().items():
            if key.startswith("KRB5"):
                mp.setenv(key, value)
        cluster = Cluster.create()
        try:
            for name, host in cluster.hosts.items():
                use_kerberos(host.config, realm.add_host(name), f"host/{name}@{realm.name}")
            cluster.start_all()
            port = cluster.hosts[REPLICA].replica_port
            cluster.cli("server", "set", "--enabled", "true", "--auth", "kerberos",
                        "--kerberos-port", str(port), host=REPLICA)  # fmt: skip
            cluster.cli("auth", "new", "--allowed-primary", PRIMARY, "--storage-location",
                        str(cluster.base / "replica-storage"), "--trust-group", "Production",
                        host=REPLICA)  # fmt: skip
            yield cluster
        finally:
            cluster.close()


def connection_test(krb: Cluster, host: str = PRIMARY) -> tuple[int, str, dict[str, Any]]:
    """``test-connection --auth kerberos`` from ``host``: exit status, error line, and row."""
    port = str(krb.hosts[REPLICA].replica_port)
    result = krb.cli("replication", "test-connection", "--replica-server", REPLICA,
                     "--replica-port", port, "--auth", "kerberos", "-o", "json", host=host,
                     check=False)  # fmt: skip
    return (
        result.returncode,
        one_line_error(result.stderr) if result.returncode else "",
        result.json()[0],
    )


def test_test_connection_authenticates_with_kerberos(krb: Cluster) -> None:
    code, _, ok = connection_test(krb)
    assert code == 0 and ok["reachable"] and ok["kerberos_ok"] and ok["authorized"], ok
    assert ok["authorization_entry"] == PRIMARY and ok["trust_group"] == "Production"
    assert ok["authentication_type"] == "kerberos" and ok["tls_ok"] is False
    code, err, refused = connection_test(krb, OTHER)
    assert code == 5 and refused["kerberos_ok"] and not refused["authorized"], refused
    assert err.startswith("vmreplica: not authorized") and "vmhost3" in err, err


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_kerberos_listener_opens_and_closes_with_the_settings(krb: Cluster) -> None:
    kerberos, certificate = free_port(), free_port()
    krb.cli("server", "set", "--enabled", "true", "--auth", "both", "--kerberos-port",
            str(kerberos), "--certificate-port", str(certificate), host=OTHER)  # fmt: skip
    assert listening(kerberos) and listening(certificate)
    krb.cli("server", "set", "--auth", "certificate", host=OTHER)
    assert not listening(kerberos) and listening(certificate)
    krb.cli("server", "set", "--auth", "kerberos", host=OTHER)
    assert listening(kerberos) and not listening(certificate)
    moved = free_port()
    krb.cli("server", "set", "--kerberos-port", str(moved), host=OTHER)
    assert listening(moved) and not listening(kerberos)
    krb.cli("server", "set", "--enabled", "false", host=OTHER)
    assert not listening(moved)


def test_replication_failover_and_reverse_over_kerberos(krb: Cluster) -> None:
    """Enable, initial copy (NBD with a PSK derived from the exchange), two cycles, planned
    failover and reverse, all with --auth kerberos; the replica verifies and equals the primary."""
    pair = Pair(krb, krb.hosts[REPLICA].replica_port, krb.base / "replica-storage")
    back_port = str(krb.hosts[PRIMARY].replica_port)
    krb.cli("server", "set", "--enabled", "true", "--auth", "both", "--kerberos-port", back_port,
            "--certificate-port", str(free_port()), host=PRIMARY)  # fmt: skip
    krb.cli("auth", "new", "--allowed-primary", REPLICA, "--storage-location",
            str(krb.base / "back-storage"), "--trust-group", "Production", host=PRIMARY)  # fmt: skip
    krb.cli("vm", "new", "krbvm", "--disk", "64M", host=PRIMARY)
    krb.cli("vm", "start", "krbvm", host=PRIMARY)
    pair.write("krbvm", 0, 0x11, "0", "1M")
    enabled = krb.cli_json("replication", "enable", "krbvm", "--replica-server", REPLICA,
                           "--replica-port", str(pair.port), "--auth", "kerberos",
                           host=PRIMARY)[0]  # fmt: skip
    assert enabled["authentication_type"] == "Kerberos", enabled
    pair.start("krbvm")
    assert pair.replication("krbvm", REPLICA)["authentication_type"] == "Kerberos"
    for pattern, offset in ((0x22, "2M"), (0x33, "4M")):
        pair.write("krbvm", 0, pattern, offset, "1M")
        krb.cli("replication", "sync", "krbvm", host=PRIMARY)
    verified_equal(pair, "krbvm")

    krb.cli("vm", "stop", "krbvm", "--force", host=PRIMARY)
    krb.cli("failover", "start", "krbvm", "--prepare", host=PRIMARY)
    krb.cli("failover", "start", "krbvm", host=REPLICA)
    krb.cli("replication", "set", "krbvm", "--reverse", host=REPLICA)
    assert state(krb, REPLICA, "krbvm") == ("Primary", "Replicating")
    assert state(krb, PRIMARY, "krbvm") == ("Replica", "Replicating")
    assert pair.replication("krbvm", REPLICA)["authentication_type"] == "Kerberos"
    krb.cli("vm", "start", "krbvm", host=REPLICA)
    assert reads(krb, REPLICA, "krbvm", 0x33, "4M", "1M")
    pair.write("krbvm", 0, 0x44, "6M", "64k", host=REPLICA)
    krb.cli("replication", "sync", "krbvm", host=REPLICA)
    back = krb.cli_json("replication", "get", "krbvm", host=PRIMARY)[0]
    assert back["mode"] == "Replica" and back["state"] == "Replicating", back


# -- refusals, each with its own reason --------------------------------------------------------


def sender_keys(realm: Realm, sender: str) -> KerberosKeys:
    return KerberosKeys(realm.keytabs[sender], f"host/{sender}@{realm.name}")


def call_replica(
    krb: Cluster, realm: Realm, sender: str, call: Callable[[Peer], Awaitable[Any]],
    replica: str = REPLICA,
) -> Any:  # fmt: skip
    """One call of the replication protocol from this process, as ``sender``, to ``replica``."""
    tls = TlsFiles(*(krb.hosts[sender].dir / "tls" / f for f in ("ca.pem", "cert.pem", "key.pem")))
    address = PeerAddress(replica, "127.0.0.1", krb.hosts[replica].replica_port, KERBEROS)

    async def run() -> Any:
        async with open_peer(address, PeerCredentials(tls, sender_keys(realm, sender))) as peer:
            return await call(peer)

    return asyncio.run(run())


def negotiate(krb: Cluster, token: bytes) -> tuple[int, dict[str, Any], str]:
    """A raw negotiate request: status, JSON body and the reply token header."""
    url = f"http://127.0.0.1:{krb.hosts[REPLICA].replica_port}{p.NEGOTIATE}"

    async def run() -> tuple[int, dict[str, Any], str]:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Negotiate {signed.b64(token)}"}
            async with session.post(url, data=b"", headers=headers) as resp:
                return resp.status, await resp.json(), resp.headers.get("WWW-Authenticate", "")

    return asyncio.run(run())


def test_replayed_authenticator_is_refused(krb: Cluster, realm: Realm) -> None:
    exchange = gss.Initiator(sender_keys(realm, PRIMARY)).start(REPLICA)
    status, body, reply = negotiate(krb, exchange.token)
    assert status == 200 and reply.startswith("Negotiate "), body
    status, body, _ = negotiate(krb, exchange.token)
    assert status == 403 and body["error"]["message"].startswith("replayed authenticator"), body


def test_a_principal_that_only_names_an_authorized_host_is_refused(
    krb: Cluster, realm: Realm
) -> None:
    """The sender is the host of a host/ or HTTP/ principal only: a user principal whose
    instance is an authorized host's name (alice/vmhost2), or another service's, was taken for
    that host."""
    keytab = realm.base / "alice.keytab"
    for name in (f"alice/{PRIMARY}@{realm.name}", f"nfs/{PRIMARY}@{realm.name}"):
        realm.run("kadmin.local", "-q", f"addprinc -randkey {name}")
        realm.run("kadmin.local", "-q", f"ktadd -k {keytab} {name}")
        exchange = gss.Initiator(KerberosKeys(keytab, name)).start(REPLICA)
        status, body, _ = negotiate(krb, exchange.token)
        assert status == 403, (name, body)
        assert body["error"]["message"].startswith("unknown principal:"), body
        assert "not a host principal" in body["error"]["message"], body


def test_tampered_body_is_refused_and_changes_nothing(krb: Cluster, realm: Realm) -> None:
    exchange = gss.Initiator(sender_keys(realm, PRIMARY)).start(REPLICA)
    status, body, reply = negotiate(krb, exchange.token)
    exchange.finish(signed.unb64(reply.partition(" ")[2], "reply"))
    context = body["result"]["context"]
    genuine = json.dumps({}).encode()
    mic = exchange.mic(signed.request_message("POST", p.HELLO, blake3.blake3(genuine).digest()))
    tampered = b'{"x": 1}' + mic + len(mic).to_bytes(4, "big")
    url = f"http://127.0.0.1:{krb.hosts[REPLICA].replica_port}{p.HELLO}"

    async def run() -> tuple[int, dict[str, Any], str | None]:
        async with aiohttp.ClientSession() as session:
            headers = {signed.CONTEXT_HEADER: context}
            async with session.post(url, data=tampered, headers=headers) as resp:
                return resp.status, await resp.json(), resp.headers.get(signed.MIC_HEADER)

    status, answer, answer_mic = asyncio.run(run())
    assert status == 403 and answer["error"]["message"].startswith("tampered body"), answer
    assert answer_mic is not None  # the refusal itself is signed: the context was known
    raw = json.dumps(answer).encode()
    del raw  # the body bytes as sent are what the MIC covers; checked by the client's own tests


def test_host_of_another_trust_group_is_refused(krb: Cluster, realm: Realm) -> None:
    """Since the reverse, krbvm's replica is on vmhost2, in the trust group of vmhost1."""
    krb.cli("auth", "new", "--allowed-primary", OTHER, "--storage-location",
            str(krb.base / "other-storage"), "--trust-group", "Other", host=PRIMARY)  # fmt: skip
    vm_id = krb.cli_json("vm", "get", "krbvm", host=PRIMARY)[0]["id"]
    with pytest.raises(AccessDenied, match="is in trust group Other, but replica VM krbvm"):
        call_replica(
            krb, realm, OTHER, lambda peer: peer.status(p.StatusRequest(vm_id)), replica=PRIMARY
        )


def restarted(krb: Cluster, host: str, **start: Any) -> None:
    krb.stop(host)
    krb.start(host, **start)


def test_clock_skew_beyond_the_realm_limit_is_refused(krb: Cluster) -> None:
    """The replica's clock runs 10 minutes ahead (libfaketime); the realm allows 5."""
    restarted(krb, REPLICA, extra_env={"LD_PRELOAD": LIBFAKETIME, "FAKETIME": "+10m"})
    try:
        code, err, row = connection_test(krb)
    finally:
        restarted(krb, REPLICA)
    assert code == 5 and row["reachable"] and not row["kerberos_ok"], row
    assert err.startswith("vmreplica: clock skew:"), err
    assert connection_test(krb)[0] == 0  # with the clock right again


def test_principal_of_another_realm_is_refused(krb: Cluster, realm: Realm) -> None:
    """The replica is told it belongs to OTHER.TEST: vmhost2's VMR.TEST principal is foreign."""
    config = krb.hosts[REPLICA].config
    original = config.read_text()
    use_kerberos(config, realm.keytabs[REPLICA], f"host/{REPLICA}@OTHER.TEST")
    restarted(krb, REPLICA)
    try:
        code, err, row = connection_test(krb)
    finally:
        config.write_text(original)
        restarted(krb, REPLICA)
    assert code == 5 and not row["kerberos_ok"], row
    assert err.startswith("vmreplica: principal of another realm:") and "VMR.TEST" in err, err


def test_missing_keytab_is_refused_on_both_sides(krb: Cluster, realm: Realm) -> None:
    keytab = realm.keytabs[OTHER]
    keytab.rename(keytab.with_suffix(".away"))
    try:
        refused = krb.cli("server", "set", "--enabled", "true", "--auth", "kerberos",
                          "--kerberos-port", str(free_port()), host=OTHER, check=False)  # fmt: skip
        code, err, _ = connection_test(krb, OTHER)
    finally:
        keytab.with_suffix(".away").rename(keytab)
    assert refused.returncode == 5, refused.stderr
    assert one_line_error(refused.stderr).startswith("vmreplica: missing or unreadable keytab")
    assert krb.cli_json("server", "get", host=OTHER)[0]["replication_enabled"] is False
    assert code == 5 and err.startswith("vmreplica: missing or unreadable keytab"), err


def test_principal_unknown_to_the_kdc_is_refused(krb: Cluster, realm: Realm) -> None:
    """vmhost3's principal is deleted from the realm (its keytab still has the key)."""
    realm.remove_principal(f"host/{OTHER}@{realm.name}")
    restarted(krb, OTHER)  # no ticket cached from earlier tests
    code, err, row = connection_test(krb, OTHER)
    assert code == 6 and not row["kerberos_ok"], row
    assert err.startswith(f"vmreplica: unknown principal: host/{OTHER}@{realm.name}"), err


def test_encrypted_replication_over_kerberos(krb: Cluster) -> None:
    """--encrypt true: every body GSS-wrapped with confidentiality; the replica still equals."""
    pair = Pair(krb, krb.hosts[REPLICA].replica_port, krb.base / "replica-storage")
    krb.cli("vm", "new", "sealvm", "--disk", "64M", host=PRIMARY)
    refused = krb.cli("replication", "enable", "sealvm", "--replica-server", REPLICA,
                      "--replica-port", str(pair.port), "--auth", "certificate", "--encrypt",
                      "true", host=PRIMARY, check=False)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "--encrypt is for Kerberos" in one_line_error(refused.stderr)
    krb.cli("vm", "start", "sealvm", host=PRIMARY)
    pair.write("sealvm", 0, 0x5A, "0", "1M")
    enabled = krb.cli_json("replication", "enable", "sealvm", "--replica-server", REPLICA,
                           "--replica-port", str(pair.port), "--auth", "kerberos", "--encrypt",
                           "true", host=PRIMARY)[0]  # fmt: skip
    assert enabled["wire_protection"] == "gss-wrap", enabled
    pair.start("sealvm")
    pair.write("sealvm", 0, 0x6B, "8M", "2M")
    krb.cli("replication", "sync", "sealvm", host=PRIMARY)
    verified_equal(pair, "sealvm")
    assert pair.replication("sealvm", REPLICA)["wire_protection"] == "gss-wrap"
    krb.cli("replication", "set", "sealvm", "--encrypt", "false", host=PRIMARY)
    pair.write("sealvm", 0, 0x7C, "12M", "1M")
    krb.cli("replication", "sync", "sealvm", host=PRIMARY)
    verified_equal(pair, "sealvm")
    assert pair.replication("sealvm")["wire_protection"] == "gss-mic"

    # Test failover, then unplanned: the split-brain guard asks the primary over Kerberos.
    krb.cli("failover", "start", "sealvm", "--as-test", host=REPLICA)
    assert krb.cli_json("vm", "get", "sealvm - Test", host=REPLICA)[0]["state"] == "Off"
    krb.cli("failover", "stop", "sealvm", host=REPLICA)
    guarded = krb.cli("failover", "start", "sealvm", host=REPLICA, check=False)
    assert guarded.returncode == 4 and "split brain" in guarded.stderr, guarded.stderr
    krb.cli("vm", "stop", "sealvm", "--force", host=PRIMARY)
    krb.cli("failover", "start", "sealvm", host=REPLICA)
    krb.cli("vm", "start", "sealvm", host=REPLICA)
    assert reads(krb, REPLICA, "sealvm", 0x7C, "12M", "1M")
    krb.cli("failover", "complete", "sealvm", "--yes", host=REPLICA)
    assert state(krb, REPLICA, "sealvm") == ("Replica", "FailedOver")
