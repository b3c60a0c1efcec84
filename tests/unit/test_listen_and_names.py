"""Listen addresses and VM names: refused in one line when written, not later when used."""

from __future__ import annotations

import pytest

from vmreplica._internal.config import parse_listen
from vmreplica._internal.validate import vm_name
from vmreplica.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:8443", ("::1", 8443)),
        ("::1:8443", ("::1", 8443)),
        ("vmhost1.example.com:65535", ("vmhost1.example.com", 65535)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_listen_addresses_taken(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    ["300.1.1.1:80", "1.2.3:80", "bad_host:80", "-x.example.com:80", "[::g]:80", "a b:80",
     "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1", ":80"],
)  # fmt: skip
def test_listen_addresses_refused_in_one_line(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_listen(text)
    assert str(err.value).startswith(f"invalid listen address {text!r}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["app", "a", "app 2", "web.v1+x_y-z", "x" * 100, "a."])
def test_vm_names_taken(name: str) -> None:
    assert vm_name(name) == name


@pytest.mark.parametrize("name", ["app ", "a  ", " app", "", "x" * 101, "-a", "a/b", ".."])
def test_vm_names_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid VM name"):
        vm_name(name)
