"""The redirect answer of a cluster node (transport/redirect.py): its shape, and distrust."""

from __future__ import annotations

import pytest

from vmreplica._internal.transport.redirect import Misdirected, Owner, redirect_in

VM = "9b2f6a52-0c1e-4f57-9a0e-2d3c4b5a6978"


def test_a_misdirected_answer_round_trips() -> None:
    err = Misdirected(VM, "node2", "10.0.0.2", 8443)
    assert err.http_status == 421
    found = redirect_in(err.to_json(), 421)
    assert found is not None and found.owner == Owner("node2", "10.0.0.2", 8443)
    assert f"VM {VM} is owned by node node2" in found.message


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (Misdirected(VM, "n", "a", 1).to_json(), 409),  # only 421 redirects
        ({"redirect": {"node": "n", "address": "a", "port": 1}}, 421),  # no error object
        ({"error": {}, "redirect": {"node": "n", "address": "a", "port": 0}}, 421),
        ({"error": {}, "redirect": {"node": "n", "address": "a", "port": 70000}}, 421),
        ({"error": {}, "redirect": {"node": "n", "address": "a\nb", "port": 1}}, 421),
        ({"error": {}, "redirect": {"node": "n", "address": "a", "port": "1"}}, 421),
        ({"error": {}, "redirect": ["n", "a", 1]}, 421),
        ([], 421),
    ],
)
def test_anything_else_is_no_redirect(body: object, status: int) -> None:
    assert redirect_in(body, status) is None
