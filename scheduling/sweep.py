"""The sweep: repairs what no event will repair on its own.

- A server whose last heartbeat is older than ``heartbeat_timeout_s`` (database
  time; agent clocks are never trusted) goes offline: its allocations are
  released and its tasks return to pending with one more attempt while retries
  remain, else fail with "server lost"; an operator alert is raised. Only
  active and draining servers are swept: one in maintenance stays as the
  operator set it, and one that never sent a heartbeat was set up by hand.
  Loss is judged from evidence only (``kernel.hearing``): while the portal
  cannot hear, or has listened for less than a timeout since it could again
  (a start, a database or web outage), nobody is judged; and when more than
  ``lost_guard_fraction`` of the servers (at least two) are silent at once, it
  is a control-plane or network fault: nobody is declared lost, an alert says so.
- A task assigned but not started within ``assign_grace_s`` returns to pending
  (judged on the same evidence: its agent may have started it during an outage).
- A running task past its ``timeout_s`` becomes timed_out and its agent is told
  to kill it.

``runscheduler`` sweeps every second; a django-q2 Schedule sweeps every minute
as a safety net. A first cheap query decides whether there is anything to do; the
repair itself holds the scheduler lock, so it never interleaves with a pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import DurationField, ExpressionWrapper, F, Q
from django.db.models.functions import Now

from kernel import hearing
from kernel.alerts import raise_alert
from kernel.models import Alert
from nodes.models import MONITORED, Node, NodeStatus
from scheduling import history, lifecycle, reservations, usage
from scheduling.choices import TaskStatus
from scheduling.lock import lock_scheduler
from scheduling.models import Allocation, ClockTimestamp, Reservation, Task
from scheduling.queue_wait import check_queue_wait
from tenants.models import QuotaGrant

log = logging.getLogger(__name__)

SWEEP_SCHEDULE_NAME = "scheduler sweep"

# (Constant SQL fragments only: nothing user-given is formatted into these.)
_LOST_NODES = f"""
SELECT id FROM nodes_node
WHERE status IN ('{NodeStatus.ACTIVE}', '{NodeStatus.DRAINING}')
  AND last_heartbeat_at < now() - make_interval(secs => %s)
  AND {hearing.LISTENED_FOR_SQL}
"""  # noqa: S608
# A gang waits for all its ranks (the start barrier) up to gang_start_timeout_s: the cheap
# check uses the shorter of the two waits, the repair below each kind's own.
_STALE_ASSIGNED = f"""
SELECT id FROM scheduling_task
WHERE status = '{TaskStatus.ASSIGNED}' AND assigned_at < now() - make_interval(secs => %s)
  AND {hearing.LISTENED_FOR_SQL}
"""  # noqa: S608
_TIMED_OUT = f"""
SELECT id FROM scheduling_task
WHERE status = '{TaskStatus.RUNNING}' AND started_at + timeout_s * interval '1 second' < now()
"""  # noqa: S608
# Approved quota grants whose window opened or closed since the last sweep.
_GRANTS_DUE = f"""
SELECT id FROM tenants_quotagrant
WHERE state = '{QuotaGrant.State.APPROVED}' AND ((applied_at IS NULL AND starts_at <= now() AND ends_at > now())
                              OR (expired_at IS NULL AND ends_at <= now()))
"""  # noqa: S608
# Approved reservations whose window opened or closed: the scheduler must look again.
_RESERVATION_BOUNDS = (f"SELECT id FROM scheduling_reservation WHERE state = '{Reservation.State.APPROVED}'"  # noqa: S608
                       " AND next_bound_at <= now()")
_ANYTHING = (f"SELECT EXISTS({_LOST_NODES}), EXISTS({_STALE_ASSIGNED}), EXISTS({_TIMED_OUT}), "
             f"EXISTS({_GRANTS_DUE}), EXISTS({_RESERVATION_BOUNDS})")


@dataclass
class SweepResult:
    servers_lost: int = 0
    requeued: int = 0
    failed: int = 0
    timed_out: int = 0
    # Servers silent past the timeout but not declared lost: most went silent at once.
    held_back: int = 0
    grants_changed: int = 0  # quota grants applied or expired
    reservation_bounds: int = 0  # reservation windows that opened or closed

    def __bool__(self) -> bool:
        return bool(self.servers_lost or self.requeued or self.failed or self.timed_out or self.grants_changed
                    or self.reservation_bounds)

    def __str__(self) -> str:
        return (f"{self.servers_lost} server(s) lost, {self.requeued} task(s) requeued, "
                f"{self.failed} failed, {self.timed_out} timed out, {self.grants_changed} quota grant(s) changed, "
                f"{self.reservation_bounds} reservation window(s) opened or closed")


def _count(result: SweepResult, task: Task) -> None:
    if task.status == TaskStatus.PENDING:
        result.requeued += 1
    else:
        result.failed += 1


def sweep(actor: str = "sweep") -> SweepResult:
    config = settings.SCHEDULER
    timeout, grace = config.heartbeat_timeout_s, config.assign_grace_s
    result = SweepResult()
    with connection.cursor() as cursor:
        first = min(grace, config.gang_start_timeout_s)
        cursor.execute(_ANYTHING, [timeout, *hearing.listened_for_params(timeout),
                                   first, *hearing.listened_for_params(first)])
        if not any(cursor.fetchone()):
            _note_guard(None)
            return result

    with transaction.atomic(), lifecycle.batch() as fan:
        # Serialise with passes: no placement onto a server being declared lost.
        lock_scheduler()

        lost = _silent_servers(timeout)
        if _mass_silence(lost):
            result.held_back, lost = len(lost), []
            _note_guard(result.held_back)
        else:
            _note_guard(None)
        for node in lost:
            reason = f"server {node.name} lost (no heartbeat for {timeout} s)"
            node.status, node.status_reason = NodeStatus.OFFLINE, reason[:255]
            node.save(update_fields=["status", "status_reason", "updated_at"])
            tasks = (Task.active_on(node.pk).select_for_update(of=("self",)).order_by("pk"))
            for task in tasks:
                # A gang's other ranks are told to stop too.
                lifecycle.requeue(task, actor=actor, reason=f"server {node.name} lost", fan=fan)
                _count(result, task)
            # Whatever is still held there (nothing, normally) is released with the server.
            Allocation.objects.filter(node=node, released_at__isnull=True).update(released_at=ClockTimestamp())
            fan.alert(Alert.Kind.SERVER_LOST, f"{reason}; its tasks were requeued or failed", node=node)
            fan.gpus.add(node.pk)
            result.servers_lost += 1

        barrier = config.gang_start_timeout_s
        late = Q(pk__in=[])
        if _listened_for(grace):
            late |= Q(nodes=1, assigned_at__lt=Now() - timedelta(seconds=grace))
        if _listened_for(barrier):
            late |= Q(nodes__gt=1, assigned_at__lt=Now() - timedelta(seconds=barrier))
        stale = (Task.objects.select_for_update(of=("self",))
                 .filter(late, status=TaskStatus.ASSIGNED)
                 .order_by("pk"))
        for task in stale:
            if task.is_gang:
                missing = [f"rank {r.rank} on {r.node.name}" for r in task.current_ranks() if r.started_at is None]
                reason = f"start barrier timed out after {barrier} s: {', '.join(missing)} not started"
            else:
                reason = f"not started within {grace} s of assignment"
            lifecycle.requeue(task, actor=actor, reason=reason, fan=fan)
            _count(result, task)

        timeout_of = ExpressionWrapper(F("timeout_s") * timedelta(seconds=1), output_field=DurationField())
        expired = (Task.objects.select_for_update(of=("self",))
                   .filter(status=TaskStatus.RUNNING, started_at__lt=Now() - timeout_of).order_by("pk"))
        for task in expired:
            # The agents drop (kill) what is no longer assigned to them.
            lifecycle.time_out(task, actor=actor, fan=fan)
            result.timed_out += 1

        db_now = _db_now()
        result.grants_changed = _quota_grant_bounds(db_now)
        result.reservation_bounds = reservations.wake_at_bounds(db_now)
        if result:
            fan.wake_as(f"sweep: {result}")
    if result:
        log.info("sweep: %s", result)
    return result


def _listened_for(seconds: float) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {hearing.LISTENED_FOR_SQL}", hearing.listened_for_params(seconds))
        return cursor.fetchone()[0]


def _silent_servers(timeout: int) -> list[Node]:
    """Active and draining servers silent for a full timeout of the portal's listening, locked."""
    if not _listened_for(timeout):
        return []
    return list(Node.objects.select_for_update()
                .filter(status__in=MONITORED)
                .filter(last_heartbeat_at__lt=Now() - timedelta(seconds=timeout)).order_by("pk"))


def _mass_silence(silent: list[Node]) -> bool:
    """More than ``lost_guard_fraction`` of the monitored servers (and at least two) silent
    at once: the likelier cause is the control plane or the network, not the servers."""
    if len(silent) < 2:
        return False
    monitored = Node.objects.filter(status__in=MONITORED,
                                    last_heartbeat_at__isnull=False).count()
    if len(silent) <= settings.SCHEDULER.lost_guard_fraction * monitored:
        return False
    raise_alert(Alert.Kind.MASS_SILENCE,
                f"{len(silent)} of {monitored} servers silent at once: treated as a control-plane or network "
                f"fault, no server declared lost (scheduler.lost_guard_fraction "
                f"{settings.SCHEDULER.lost_guard_fraction})")
    return True


_guard_state: int | None = None


def _note_guard(held_back: int | None) -> None:
    """Log once per change of the mass-silence guard, not once per sweep."""
    global _guard_state
    if held_back == _guard_state:
        return
    if held_back is not None:
        log.warning("%d servers silent at once: a control-plane or network fault; declaring no server lost",
                    held_back)
    elif _guard_state is not None:
        log.info("mass silence over: servers are judged one by one again")
    _guard_state = held_back


def _db_now():
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


def _quota_grant_bounds(now) -> int:
    """Stamp approved grants whose window opened or closed, with a notice each; the pass
    this sweep then requests applies (or stops applying) the extra quota. The quota itself
    follows the clock (passes.load_snapshot), so a late sweep delays only the notice and
    the wake-up, never the bound."""

    changed = 0
    due = (QuotaGrant.objects.select_for_update(of=("self",)).select_related("tenant")
           .filter(Q(applied_at__isnull=True, starts_at__lte=now, ends_at__gt=now)
                   | Q(expired_at__isnull=True, ends_at__lte=now), state=QuotaGrant.State.APPROVED)
           .order_by("pk"))
    for grant in due:
        fields = []
        if grant.applied_at is None and grant.starts_at <= now < grant.ends_at:
            grant.applied_at = now
            fields.append("applied_at")
            text = (f"quota grant #{grant.pk} for {grant.tenant.slug} applied: {grant.extras_text()} "
                    f"until {grant.ends_at:%Y-%m-%d %H:%M} UTC ({grant.reason})")
        elif grant.expired_at is None and grant.ends_at <= now:
            grant.expired_at = now
            fields.append("expired_at")
            text = f"quota grant #{grant.pk} for {grant.tenant.slug} expired: {grant.extras_text()} no longer apply"
        else:
            continue
        grant.save(update_fields=fields)
        raise_alert(Alert.Kind.QUOTA_GRANT, text, repeat=True)
        changed += 1
    return changed


def sweep_task() -> str:
    """The django-q2 scheduled safety net (every minute); also the queue-wait alert check."""

    result = sweep(actor="sweep:q")
    check_queue_wait()
    # The usage ledger's upkeep (utilisation sample, roll-up) rides on the same minute.
    usage.maintain()
    history.record()  # runscheduler samples every HISTORY_SAMPLE_S; this keeps charts going without it
    return str(result)


def register_schedule(**kwargs) -> None:
    """Register the every-minute sweep Schedule; idempotent (post_migrate)."""
    from django_q.models import Schedule

    Schedule.objects.update_or_create(
        name=SWEEP_SCHEDULE_NAME,
        defaults={"func": "scheduling.sweep.sweep_task", "schedule_type": Schedule.MINUTES, "minutes": 1,
                  "repeats": -1},
    )
