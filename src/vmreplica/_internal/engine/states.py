"""Replication states (Hyper-V's names) and the one table of the transitions between them.

Every change of a relationship's state goes through :func:`transition`, which finds the new
state in :data:`TRANSITIONS` or refuses the command with the current state and, in words, the
commands that state allows. The table is keyed by the side of the relationship the host holds,
because the same state allows different commands on the primary and on the replica (a replica
that is Replicating can fail over; a primary that is Replicating can prepare a planned one).
A reverse changes the side: its entry is on the side the host held before it.

Pure: no I/O, no clock. Tested exhaustively in tests/unit/test_states.py.
"""

from __future__ import annotations

import enum

from vmreplica.errors import InvalidState


class State(enum.StrEnum):
    DISABLED = "Disabled"
    READY_FOR_INITIAL = "ReadyForInitialReplication"
    INITIAL_IN_PROGRESS = "InitialReplicationInProgress"
    WAITING_FOR_INITIAL = "WaitingForInitialReplication"
    REPLICATING = "Replicating"
    SUSPENDED = "Suspended"
    ERROR = "Error"
    WAITING_FOR_RESYNC = "WaitingForStartResynchronize"
    RESYNCHRONIZING = "Resynchronizing"
    RESYNC_SUSPENDED = "ResynchronizeSuspended"
    PREPARED_FOR_FAILOVER = "PreparedForFailover"
    FAILED_OVER_WAITING = "FailedOverWaitingCompletion"
    FAILED_OVER = "FailedOver"


class Side(enum.StrEnum):
    """Which end of the relationship this host holds: the relationship's mode."""

    PRIMARY = "Primary"
    REPLICA = "Replica"


class Command(enum.Enum):
    """What moves a relationship from one state to another; ``verb`` is for the operator, and
    ``operator`` says whether an operator can ask for it (the others happen to a relationship:
    a copy that ends, tracking that is lost)."""

    START_INITIAL = ("start_initial", "start initial replication", True)
    START_INITIAL_FROM_COPY = (
        "start_initial_from_copy",
        "start initial replication from the copy on the replica (start-initial --use-backup)",
        True,
    )
    RESUME_INITIAL_FROM_KEPT = (
        "resume_initial_from_kept",
        "resume initial replication from the part of the copy already on the replica",
        False,
    )
    STOP_INITIAL = ("stop_initial", "stop initial replication (replication stop-initial)", True)
    RETRY_INITIAL = ("retry_initial", "start initial replication again", True)
    FINISH_INITIAL = ("finish_initial", "finish initial replication", False)
    FAIL_INITIAL = ("fail_initial", "fail initial replication", False)
    LOSE_TRACKING = ("lose_tracking", "lose change tracking", False)
    SUSPEND = ("suspend", "suspend replication", True)
    RESUME = ("resume", "resume replication", True)
    RESUME_BEFORE_INITIAL = ("resume_before_initial", "resume replication", True)
    START_RESYNC = ("start_resync", "resynchronize", True)
    FINISH_RESYNC = ("finish_resync", "finish the resynchronization", False)
    CANCEL_RESYNC = ("cancel_resync", "stop the resynchronization (replication stop)", True)
    CANCEL_SEEDING = ("cancel_seeding", "stop the initial replication from a copy", False)
    PREPARE_FAILOVER = (
        "prepare_failover",
        "prepare a planned failover (failover start --prepare)",
        True,
    )
    CANCEL_PREPARED = ("cancel_prepared", "cancel the prepared failover (failover stop)", True)
    FAIL_OVER = ("fail_over", "fail over (failover start)", True)
    CANCEL_FAILOVER = ("cancel_failover", "cancel the failover (failover stop)", True)
    COMPLETE_FAILOVER = ("complete_failover", "complete the failover (failover complete)", True)
    REVERSE = ("reverse", "reverse replication (replication set --reverse)", True)
    REVERSE_WITHOUT_TRACKING = (
        "reverse_without_tracking",
        "reverse replication (replication set --reverse)",
        True,
    )
    BECOME_REPLICA = (
        "become_replica",
        "become the replica of the host the VM failed over to",
        False,
    )

    def __init__(self, key: str, verb: str, operator: bool) -> None:
        self.key = key
        self.verb = verb
        self.operator = operator


S, C, P, R = State, Command, Side.PRIMARY, Side.REPLICA

TRANSITIONS: dict[tuple[Side, State, Command], State] = {
    # Initial replication, on the primary.
    (P, S.READY_FOR_INITIAL, C.START_INITIAL): S.INITIAL_IN_PROGRESS,
    (P, S.INITIAL_IN_PROGRESS, C.RETRY_INITIAL): S.INITIAL_IN_PROGRESS,
    (P, S.INITIAL_IN_PROGRESS, C.FINISH_INITIAL): S.REPLICATING,
    (P, S.INITIAL_IN_PROGRESS, C.FAIL_INITIAL): S.ERROR,
    # ... and on the replica, once the copy is applied.
    (R, S.WAITING_FOR_INITIAL, C.FINISH_INITIAL): S.REPLICATING,
    # Initial replication from a copy already on the replica (seeding): a resynchronization of
    # that copy, so only the blocks that differ travel.
    (P, S.READY_FOR_INITIAL, C.START_INITIAL_FROM_COPY): S.RESYNCHRONIZING,
    # A plain copy that was cut, retried against what the replica kept of it (a seed, so the
    # same resynchronization): the blocks that arrived are compared, not sent again.
    (P, S.INITIAL_IN_PROGRESS, C.RESUME_INITIAL_FROM_KEPT): S.RESYNCHRONIZING,
    (R, S.WAITING_FOR_INITIAL, C.START_RESYNC): S.RESYNCHRONIZING,
    (R, S.RESYNCHRONIZING, C.CANCEL_SEEDING): S.WAITING_FOR_INITIAL,
    # Stopping an initial replication of any kind: back to where it can be started again.
    (P, S.INITIAL_IN_PROGRESS, C.STOP_INITIAL): S.READY_FOR_INITIAL,
    (P, S.RESYNCHRONIZING, C.STOP_INITIAL): S.READY_FOR_INITIAL,
    (P, S.RESYNC_SUSPENDED, C.STOP_INITIAL): S.READY_FOR_INITIAL,
    # Tracking lost: a QEMU that died, a sequence gap, a pending log grown too large.
    (P, S.INITIAL_IN_PROGRESS, C.LOSE_TRACKING): S.WAITING_FOR_RESYNC,
    (P, S.REPLICATING, C.LOSE_TRACKING): S.WAITING_FOR_RESYNC,
    (P, S.SUSPENDED, C.LOSE_TRACKING): S.WAITING_FOR_RESYNC,
    (P, S.ERROR, C.LOSE_TRACKING): S.WAITING_FOR_RESYNC,
    (P, S.WAITING_FOR_RESYNC, C.LOSE_TRACKING): S.WAITING_FOR_RESYNC,
    (P, S.RESYNCHRONIZING, C.LOSE_TRACKING): S.WAITING_FOR_RESYNC,
    (P, S.RESYNC_SUSPENDED, C.LOSE_TRACKING): S.WAITING_FOR_RESYNC,
    # Suspend and resume, on the primary.
    (P, S.REPLICATING, C.SUSPEND): S.SUSPENDED,
    (P, S.RESYNCHRONIZING, C.SUSPEND): S.RESYNC_SUSPENDED,
    (P, S.SUSPENDED, C.RESUME): S.REPLICATING,
    (P, S.ERROR, C.RESUME): S.REPLICATING,
    (P, S.ERROR, C.RESUME_BEFORE_INITIAL): S.READY_FOR_INITIAL,
    (P, S.SUSPENDED, C.RESUME_BEFORE_INITIAL): S.READY_FOR_INITIAL,
    (P, S.RESYNC_SUSPENDED, C.RESUME): S.RESYNCHRONIZING,
    # Resynchronization: started and finished on the primary, which takes the replica along.
    (P, S.WAITING_FOR_RESYNC, C.START_RESYNC): S.RESYNCHRONIZING,
    (P, S.RESYNCHRONIZING, C.FINISH_RESYNC): S.REPLICATING,
    (P, S.RESYNCHRONIZING, C.CANCEL_RESYNC): S.WAITING_FOR_RESYNC,
    (P, S.RESYNC_SUSPENDED, C.CANCEL_RESYNC): S.WAITING_FOR_RESYNC,
    (P, S.WAITING_FOR_RESYNC, C.CANCEL_RESYNC): S.WAITING_FOR_RESYNC,  # a scheduled one
    (R, S.REPLICATING, C.START_RESYNC): S.RESYNCHRONIZING,
    (R, S.RESYNCHRONIZING, C.FINISH_RESYNC): S.REPLICATING,
    (R, S.RESYNCHRONIZING, C.CANCEL_RESYNC): S.REPLICATING,
    # Planned failover: prepared on the primary, cancelled there, or carried out on the replica.
    (P, S.REPLICATING, C.PREPARE_FAILOVER): S.PREPARED_FOR_FAILOVER,
    (P, S.PREPARED_FOR_FAILOVER, C.CANCEL_PREPARED): S.REPLICATING,
    (R, S.REPLICATING, C.FAIL_OVER): S.FAILED_OVER_WAITING,
    (R, S.FAILED_OVER_WAITING, C.CANCEL_FAILOVER): S.REPLICATING,
    (R, S.FAILED_OVER_WAITING, C.COMPLETE_FAILOVER): S.FAILED_OVER,
    # Reverse: the failed-over replica becomes the primary, the old primary the replica.
    (R, S.FAILED_OVER_WAITING, C.REVERSE): S.REPLICATING,
    (R, S.FAILED_OVER, C.REVERSE): S.REPLICATING,
    (R, S.FAILED_OVER_WAITING, C.REVERSE_WITHOUT_TRACKING): S.WAITING_FOR_RESYNC,
    (R, S.FAILED_OVER, C.REVERSE_WITHOUT_TRACKING): S.WAITING_FOR_RESYNC,
    **{
        (P, state, C.BECOME_REPLICA): S.REPLICATING
        for state in (
            S.REPLICATING,
            S.PREPARED_FOR_FAILOVER,
            S.SUSPENDED,
            S.ERROR,
            S.WAITING_FOR_RESYNC,
            S.READY_FOR_INITIAL,
        )
    },
}
del S, C, P, R


def allowed(side: Side, state: State) -> list[Command]:
    """The operator's commands that ``state`` allows on ``side``, in the table's order."""
    return [c for (s, st, c) in TRANSITIONS if s == side and st == state and c.operator]


def transition(side: Side, state: State, command: Command, vm: str = "the VM") -> State:
    """The state ``command`` leads to, or InvalidState naming what the state allows instead."""
    target = TRANSITIONS.get((side, state, command))
    if target is not None:
        return target
    verbs = list(dict.fromkeys(c.verb for c in allowed(side, state)))
    if verbs:
        options = "; it allows: " + ", ".join(verbs)
    elif state == State.DISABLED:
        options = "; enable replication first"
    else:
        options = "; it allows no command on this host now"
    where = "primary" if side == Side.PRIMARY else "replica"
    raise InvalidState(
        f"cannot {command.verb} for {vm} on its {where} server: replication is {state}{options}"
    )
