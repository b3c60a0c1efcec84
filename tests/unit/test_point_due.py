"""When an apply opens a recovery point (engine/replica/points.point_due): pure, no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vmreplica._internal.engine.replica.points import point_due
from vmreplica._internal.engine.states import State

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def due(**changes: Any) -> str | None:
    args: dict[str, Any] = {
        "history": 2, "last_rp_time": T0.isoformat(), "state": State.REPLICATING,
        "initial": False, "application_consistent": False, "interval": 60,
        "now": T0 + timedelta(seconds=61),
    }  # fmt: skip
    args.update(changes)
    return point_due(**args)


def test_a_point_is_due_once_the_interval_has_passed() -> None:
    assert due() == "Standard"
    assert due(now=T0 + timedelta(seconds=60)) == "Standard"  # exactly the interval
    assert due(now=T0 + timedelta(seconds=59)) is None
    assert due(now=T0) is None


@pytest.mark.parametrize("late", [1, 59, 61, 3600, 86400 * 7])
def test_the_initial_copy_is_never_a_point_however_late_the_replica_asks(late: int) -> None:
    """The defect: the initial copy sets last_rp_time, and a replica slower than the interval
    between that apply and the check froze the initial copy itself as a point."""
    now = T0 + timedelta(seconds=late)
    assert due(initial=True, now=now, interval=1) is None
    assert due(initial=True, now=now, application_consistent=True) is None


def test_no_history_no_point() -> None:
    assert due(history=0) is None
    assert due(history=0, application_consistent=True) is None


def test_points_have_not_started_before_the_initial_copy() -> None:
    assert due(last_rp_time=None) is None
    assert due(last_rp_time=None, application_consistent=True) is None


@pytest.mark.parametrize("state", [State.RESYNCHRONIZING, State.WAITING_FOR_INITIAL])
def test_no_point_while_resynchronizing_or_waiting_for_the_initial_copy(state: State) -> None:
    assert due(state=state) is None
    assert due(state=state, application_consistent=True) is None


def test_an_application_consistent_delta_always_makes_its_kind() -> None:
    assert due(application_consistent=True, now=T0) == "ApplicationConsistent"
    assert due(application_consistent=True) == "ApplicationConsistent"


def test_the_age_is_measured_with_the_offset_of_the_stored_time() -> None:
    stored = (T0 + timedelta(hours=2)).astimezone(tz=None).isoformat()  # another offset
    assert due(last_rp_time=stored, now=T0 + timedelta(hours=2, seconds=30)) is None
    assert due(last_rp_time=stored, now=T0 + timedelta(hours=2, seconds=90)) == "Standard"
