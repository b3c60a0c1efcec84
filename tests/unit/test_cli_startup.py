"""The CLI's start-up: a command imports its own command group only, and neither `cryptography`
nor rich unless it needs them (every command paid about 0.1 s of CPU for them before); --help
still lists every group, and an unknown one is a one-line usage error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vmreplica._internal.cli.main import GROUPS, main

_PROBE = """
import contextlib, io, json, sys
from vmreplica._internal.cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    main(sys.argv[1:])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("cryptography", "rich")
                        or m.startswith("vmreplica._internal.cli."))))
"""


def loaded(*argv: str) -> set[str]:
    """The modules a fresh interpreter holds after running the CLI with ``argv``."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=True,
        env={"VMREPLICA_SOCKET": "/nonexistent/agent.sock", "PATH": "/usr/bin:/bin",
             "PYTHONPATH": ":".join(sys.path)},
    )  # fmt: skip
    return set(json.loads(done.stdout))


def test_a_command_loads_its_group_alone() -> None:
    modules = loaded("replication", "get", "app", "-o", "json")  # fails: no agent
    groups = {m.removeprefix("vmreplica._internal.cli.") for m in modules}
    assert "replication" in groups
    assert not groups & {"host", "cluster", "cert", "auth", "vm", "failover", "event"}, groups
    assert not {m for m in modules if m.startswith(("cryptography", "rich"))}, modules


def test_help_lists_every_group(capsys: pytest.CaptureFixture[str]) -> None:
    modules = loaded("--help")
    assert {f"vmreplica._internal.cli.{m}" for m in GROUPS.values()} <= modules
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = out.split("Commands:")[1].split()
    assert all(name in listed for name in GROUPS), out
    assert main(["vm", "--help"]) == 0
    assert "move" in capsys.readouterr().out.split("Commands:")[1]


def test_an_unknown_group_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "vmreplica: No such command 'nosuch'. (see `vmreplica --help`)"
