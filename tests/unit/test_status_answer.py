"""The replica's status answer: ``kept_initial`` (a cut initial copy kept as its base,
engine/replica/kept.py) travels, and an answer without it (an older replica) means none."""

from __future__ import annotations

import pytest

from vmreplica._internal.transport import answers
from vmreplica.errors import VmrError


def test_kept_initial_travels_and_defaults_to_none_kept() -> None:
    kept = answers.StatusAnswer(0, "WaitingForInitialReplication", kept_initial=True)
    assert answers.StatusAnswer.from_json(kept.to_json()) == kept
    plain = answers.StatusAnswer(3, "Replicating")
    assert "kept_initial" not in plain.to_json()
    assert answers.StatusAnswer.from_json({"sequence": 3, "state": "Replicating"}) == plain


def test_a_kept_initial_that_is_not_a_boolean_is_refused() -> None:
    with pytest.raises(VmrError, match="kept_initial"):
        answers.StatusAnswer.from_json({"sequence": 0, "state": "x", "kept_initial": "yes"})
