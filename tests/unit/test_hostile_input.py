"""Hostile input, property-based (hypothesis): every parser a peer or an operator can reach
either accepts its input or refuses it with a VmrError (a one-line message and an exit code),
never another exception; a delta stream that was cut or changed is refused and leaves nothing
behind, or (a change to a field its disks do not depend on, such as its creation time) staged
whole and consistent. (The peer routes and management methods are fuzzed through real agents in
tests/integration/test_fuzz.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmreplica._internal.api.body import parse_object
from vmreplica._internal.bandwidth import Schedule, parse_rate
from vmreplica._internal.transport import delta as wire
from vmreplica._internal.transport import delta_receive, delta_resume, protocol
from vmreplica._internal.transport.media import MediaManifest
from vmreplica.errors import IntegrityError, VmrError

NASTY_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", "../../etc/passwd", "/", "a/b", "\0", "x\0y", "\n", "\x1b[2J", "é"]),
    st.integers(0, 3).map(lambda n: "ab/."[n] * 10_000),
)
JSON = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False), NASTY_TEXT,
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NASTY_TEXT, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip

REQUESTS = [
    cls
    for _, cls in inspect.getmembers(protocol, inspect.isclass)
    if dataclasses.is_dataclass(cls)
    and hasattr(cls, "from_json")
    and cls.__module__ == protocol.__name__
]
VALID_VM = "7f0c3b1e-6a4d-4f39-9a8e-2c5d1e0f4b6a"


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("request_class", REQUESTS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_request_parser_accepts_or_refuses_cleanly(request_class: type, data: Any) -> None:
    # Half the time the real field names (with hostile values), so parsing gets past the first key.
    keys = st.sampled_from(["vm_id", *_field_names(request_class)]) | NASTY_TEXT
    body = data.draw(st.dictionaries(keys, JSON, max_size=6))
    if data.draw(st.booleans()):
        body["vm_id"] = VALID_VM
    try:
        request_class.from_json(body)  # type: ignore[attr-defined]
    except VmrError as e:
        assert "\n" not in e.message and e.message
    except RecursionError:  # pragma: no cover - the test would fail below
        pytest.fail("recursion")


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_request_bodies_parse_or_refuse(raw: bytes) -> None:
    try:
        assert isinstance(parse_object(raw), dict)
    except VmrError as e:
        assert "\n" not in e.message


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_manifests_parse_or_refuse(raw: bytes) -> None:
    for parse in (wire.DeltaManifest.from_json, lambda r: MediaManifest.from_json(json.loads(r))):
        try:
            parse(raw)
        except VmrError as e:
            assert "\n" not in e.message
        except (ValueError, TypeError, AttributeError):
            # only json.loads above may raise these, before MediaManifest sees anything
            assert parse is not wire.DeltaManifest.from_json


@settings(max_examples=200, deadline=None)
@given(text=NASTY_TEXT | st.text(alphabet="MonFri-*=,: 0123456789kMG", max_size=60))
def test_rates_and_schedules_parse_or_refuse(text: str) -> None:
    for parse in (parse_rate, Schedule.parse):
        try:
            parse(text)
        except VmrError as e:
            assert "\n" not in e.message


@pytest.fixture(scope="module")
def delta_stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """A real delta of one small disk, as it goes on the wire."""
    import subprocess

    d = tmp_path_factory.mktemp("delta")
    disk = wire.disk_file(d, 0)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64k 64k", str(disk)],
                   check=True, capture_output=True)  # fmt: skip
    manifest = asyncio.run(wire.build_manifest(d, VALID_VM, 7, "CrashConsistent", "zstd"))

    async def collect() -> bytes:
        return b"".join([c async for c in wire.iter_stream(d, manifest)])

    return asyncio.run(collect()), VALID_VM


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _as_the_replica_checks(manifest: wire.DeltaManifest) -> None:
    """The replica's own check (engine/replica/receive.py) of the fields that only it knows the
    right values of: the next sequence number (7 here) and its VM's disks. Without it a changed
    digit of the sequence (7 to 6) is a well-formed delta as far as the stream can tell."""
    if manifest.sequence != 7 or [d.index for d in manifest.disks] != [0]:
        raise IntegrityError(f"delta {manifest.sequence} is not the one expected")


def _receive(data: bytes, stage: Path, chunk: int) -> wire.DeltaManifest:
    return asyncio.run(
        delta_receive.receive(
            _chunks(data, chunk), stage, expected_vm_id=VALID_VM,
            check_manifest=_as_the_replica_checks,
        )
    )  # fmt: skip


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_cut_or_changed_delta_is_refused_and_never_staged(
    data: Any, delta_stream: tuple[bytes, str], tmp_path: Path
) -> None:
    stream, _ = delta_stream
    how = data.draw(st.sampled_from(["cut", "flip", "append", "junk"]))
    if how == "cut":
        sent = stream[: data.draw(st.integers(0, len(stream) - 1))]
    elif how == "flip":
        at = data.draw(st.integers(0, len(stream) - 1))
        sent = stream[:at] + bytes([stream[at] ^ data.draw(st.integers(1, 255))]) + stream[at + 1 :]
    elif how == "append":
        sent = stream + data.draw(st.binary(min_size=1, max_size=64))
    else:
        sent = data.draw(st.binary(max_size=2000))
    # A directory of its own per example: tmp_path is shared by all of them, and an accepted
    # delta leaves its stage behind.
    stage = Path(tempfile.mkdtemp(dir=tmp_path)) / "stage"
    chunk = data.draw(st.integers(1, 70_000))
    try:
        _receive(sent, stage, chunk)
    except delta_receive.StreamCut as e:
        # A stream that stops short of what it announced is a lost connection (a changed block
        # length that points past the end looks the same): what arrived is kept as a resume
        # point, never as a delta (no manifest staged). A resume hashes the kept part again.
        assert "\n" not in e.message
        assert not (stage / wire.MANIFEST).exists()
        assert not stage.exists() or delta_resume.load(stage) is not None
        return
    except VmrError as e:
        assert "\n" not in e.message
        assert not stage.exists()  # nothing staged, nothing half-written
        return
    # Accepted: every staged disk still matches the hash its manifest gives (a change the
    # manifest's checks cannot see, such as a digit of its creation time, gets this far).
    received = delta_receive.stage_is_complete(stage)
    assert received is not None and received.sequence == 7
