"""The state table: every listed transition, and a refusal for every one it does not list."""

from __future__ import annotations

import itertools

import pytest

from vmreplica._internal.engine.states import (
    TRANSITIONS,
    Command,
    Side,
    State,
    allowed,
    transition,
)
from vmreplica.errors import InvalidState

# Hyper-V's transitions (../shared/REFERENCE.md), spelt out once more, independently of the
# table: a transition added to or dropped from the table without a reason fails here.
EXPECTED = {
    (Side.PRIMARY, State.READY_FOR_INITIAL, Command.START_INITIAL): State.INITIAL_IN_PROGRESS,
    (Side.PRIMARY, State.INITIAL_IN_PROGRESS, Command.FINISH_INITIAL): State.REPLICATING,
    (Side.REPLICA, State.WAITING_FOR_INITIAL, Command.FINISH_INITIAL): State.REPLICATING,
    (Side.PRIMARY, State.REPLICATING, Command.SUSPEND): State.SUSPENDED,
    (Side.PRIMARY, State.SUSPENDED, Command.RESUME): State.REPLICATING,
    (Side.PRIMARY, State.ERROR, Command.RESUME): State.REPLICATING,
    (Side.PRIMARY, State.REPLICATING, Command.LOSE_TRACKING): State.WAITING_FOR_RESYNC,
    (Side.PRIMARY, State.WAITING_FOR_RESYNC, Command.START_RESYNC): State.RESYNCHRONIZING,
    (Side.PRIMARY, State.RESYNCHRONIZING, Command.SUSPEND): State.RESYNC_SUSPENDED,
    (Side.PRIMARY, State.RESYNCHRONIZING, Command.FINISH_RESYNC): State.REPLICATING,
    (Side.PRIMARY, State.RESYNCHRONIZING, Command.CANCEL_RESYNC): State.WAITING_FOR_RESYNC,
    (Side.PRIMARY, State.RESYNC_SUSPENDED, Command.CANCEL_RESYNC): State.WAITING_FOR_RESYNC,
    (Side.PRIMARY, State.REPLICATING, Command.PREPARE_FAILOVER): State.PREPARED_FOR_FAILOVER,
    (Side.REPLICA, State.REPLICATING, Command.FAIL_OVER): State.FAILED_OVER_WAITING,
    (Side.REPLICA, State.FAILED_OVER_WAITING, Command.CANCEL_FAILOVER): State.REPLICATING,
    (Side.REPLICA, State.FAILED_OVER_WAITING, Command.COMPLETE_FAILOVER): State.FAILED_OVER,
    (Side.REPLICA, State.FAILED_OVER, Command.REVERSE): State.REPLICATING,
    # Seeding (Start-VMInitialReplication -UseBackup) and Stop-VMInitialReplication.
    (Side.PRIMARY, State.READY_FOR_INITIAL, Command.START_INITIAL_FROM_COPY): (
        State.RESYNCHRONIZING
    ),
    (Side.REPLICA, State.WAITING_FOR_INITIAL, Command.START_RESYNC): State.RESYNCHRONIZING,
    (Side.REPLICA, State.RESYNCHRONIZING, Command.CANCEL_SEEDING): State.WAITING_FOR_INITIAL,
    (Side.PRIMARY, State.INITIAL_IN_PROGRESS, Command.STOP_INITIAL): State.READY_FOR_INITIAL,
    (Side.PRIMARY, State.RESYNCHRONIZING, Command.STOP_INITIAL): State.READY_FOR_INITIAL,
}


def test_hyper_v_transitions_are_in_the_table() -> None:
    for (side, state, command), target in EXPECTED.items():
        assert transition(side, state, command) == target


@pytest.mark.parametrize(
    ("side", "state", "command"), list(itertools.product(Side, State, Command))
)
def test_every_pair_the_table_does_not_list_is_refused(
    side: Side, state: State, command: Command
) -> None:
    target = TRANSITIONS.get((side, state, command))
    if target is not None:
        assert transition(side, state, command) == target
        return
    with pytest.raises(InvalidState) as refused:
        transition(side, state, command, "web1")
    message = refused.value.message
    assert f"cannot {command.verb} for web1" in message and f"replication is {state}" in message
    for other in allowed(side, state):
        assert other.verb in message


def test_refusals_say_what_the_state_allows_in_words() -> None:
    with pytest.raises(InvalidState) as refused:
        transition(Side.PRIMARY, State.SUSPENDED, Command.PREPARE_FAILOVER, "web1")
    assert refused.value.message == (
        "cannot prepare a planned failover (failover start --prepare) for web1 on its primary "
        "server: replication is Suspended; it allows: resume replication"
    )
    with pytest.raises(InvalidState, match="enable replication first"):
        transition(Side.PRIMARY, State.DISABLED, Command.SUSPEND)


def test_failed_over_states_allow_no_delta_path_commands_on_the_replica() -> None:
    for state in (State.FAILED_OVER_WAITING, State.FAILED_OVER):
        for command in (Command.FINISH_INITIAL, Command.FAIL_OVER, Command.SUSPEND):
            with pytest.raises(InvalidState):
                transition(Side.REPLICA, state, command)


def test_internal_commands_are_not_offered_to_the_operator() -> None:
    for side, state in itertools.product(Side, State):
        assert all(command.operator for command in allowed(side, state))
