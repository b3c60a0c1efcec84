"""parse_size: operator-typed sizes with qemu's binary suffixes."""

from __future__ import annotations

import pytest

from vmreplica._internal.validate import size as parse_size
from vmreplica.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        ("1", 1),
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("1.5G", 3 << 29),
        ("0.5K", 512),
        ("2k", 2048),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        ("1E", 1 << 60),
        ("64KiB", 64 << 10),
        ("64KB", 64 << 10),
        ("100B", 100),
        (" 8G ", 8 << 30),
        ("1.G", 1 << 30),
        (".5M", 1 << 19),
    ],
)
def test_valid_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "12Q",
        "0",
        "0G",
        "0.0M",
        "-1",
        "-1G",
        "",
        "G",
        "1.5",
        "0.3K",
        "1 G B",
        "1e9",
        "0x10",
        "1..5G",
    ],
)
def test_invalid_sizes(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_size(text)
    assert repr(text) in str(err.value)
