"""The lease fence on a virtual clock (cluster/fence.py), and etcd endpoint parsing."""

from __future__ import annotations

import pytest

from vmreplica._internal.cluster.fence import SAFE_FRACTION, Fence, Fenced
from vmreplica._internal.cluster_config import parse_endpoints
from vmreplica.errors import InvalidArgument


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_node_never_renewed_is_fenced() -> None:
    with pytest.raises(Fenced, match="node n1 holds no valid cluster lease: refusing to apply"):
        Fence("n1", Clock()).check("apply")


def test_the_deadline_counts_from_the_send_and_stops_before_etcd_expires() -> None:
    clock = Clock()
    fence = Fence("n1", clock)
    fence.renewed(sent_at=99.0, ttl=6)  # etcd received it at >= 99: it expires at >= 105
    deadline = 99.0 + 6 * SAFE_FRACTION
    clock.now = deadline - 0.01
    fence.check("apply")
    clock.now = deadline
    with pytest.raises(Fenced):
        fence.check("apply")
    assert deadline < 105


def test_a_late_old_answer_does_not_move_the_deadline_back() -> None:
    clock = Clock()
    fence = Fence("n1", clock)
    fence.renewed(sent_at=100.0, ttl=6)
    fence.renewed(sent_at=90.0, ttl=6)
    clock.now = 103.9
    assert fence.valid


def test_a_lease_etcd_says_is_gone_fences_at_once() -> None:
    clock = Clock()
    fence = Fence("n1", clock)
    fence.renewed(sent_at=100.0, ttl=6)
    fence.renewed(sent_at=100.5, ttl=0)
    assert not fence.valid and fence.remaining == 0


@pytest.mark.parametrize(
    "value",
    ["", "127.0.0.1:2379", "ftp://a:1", "http://a", "https://a:x", "http://a:1/x", "http://:1"],
)
def test_bad_etcd_urls_are_one_line_errors(value: str) -> None:
    with pytest.raises(InvalidArgument, match="--etcd"):
        parse_endpoints(value)


def test_etcd_urls() -> None:
    assert parse_endpoints("http://a:1, http://b:2") == ("http://a:1", "http://b:2")
