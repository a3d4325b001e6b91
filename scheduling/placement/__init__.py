"""The placement core: pure Python over plain objects, no ORM, no clock reads.

Entry point: ``schedule(snapshot: Snapshot) -> Plan``. The DB layer
(``scheduling.passes``) loads a ``Snapshot``, calls ``schedule`` and applies the ``Plan``:
preemptions first (the victims return to pending), then placements (allocation rows
record ``Placement.memory_mb`` and ``Placement.exclusive``), then the pending reasons and
queue positions. The input snapshot is never mutated. ``schedule_timed`` also returns the
time spent on each task (``bench/core.py``); ``snapshot_order`` / ``queue_order`` give the
order a pass takes tasks in.

This package imports nothing but the standard library and itself (no Django, no other
app), so it can be read, tested and benchmarked alone. Its modules, by concern:

=================  ==========================================================================
``types``          the input (``Snapshot`` and its parts) and the output (``Plan``)
``config``         ``SchedulerConfig`` and the checking of its options from a mapping
``order``          queue order (priority, fair share, FIFO) and the fair-share note
``state``          the working state: GPU/server columns, buckets and indexes, usage;
                   ``take``/``release`` keep them consistent
``fit``            THE fit rule (may a GPU take a request now), used by every check below
``scoring``        GPU scores (affinity + load balance) and picking a server's best GPUs
``search``         constraints, the single-server scan, capacity reasons
``gangs``          the same for gangs across servers
``admission``      quota, quota holds, class share, no-backfill wait, GPUs to keep off
``backfill``       the blocked head's reservation, replaying ends
``preemption``     reclaim of borrowed GPUs and priority preemption
``reasons``        every reason's words, from the figures the checks found
``planner``        ``Pass``: one pass, each task decided once, in queue order
=================  ==========================================================================

Rules, in the order a task meets them
-------------------------------------
1. **Order.** Pending tasks are taken by priority (CRITICAL > HIGH > NORMAL > LOW), then
   (with ``config.fair_share``) by their tenant's fair-share factor, higher first
   (``TenantState.fair_share``, 2^(-usage/share) computed by the DB layer), then FIFO by
   ``created_at``, then ``id``. A task left waiting for capacity while a task of a tenant
   with a higher factor, submitted after it at the same priority, was placed says so in
   its reason ("fair share: ..."). Each task is decided once per pass, in that order;
   the pass keeps a working copy of GPU, tenant and class usage that every placement
   (and preemption) updates, so later tasks see what earlier ones took.
2. **Constraints.** ``node_selector`` must be a subset of the server's labels;
   ``gpu_model`` is a case-insensitive substring of the GPU's model name; only active
   servers and schedulable GPUs count. A task no active server could ever hold (too
   many GPUs, too much memory, no such labels or model) waits with that reason
   ("no active server has GPUs matching gpu_model 'A100'") and blocks nobody.
3. **Tenant quota.** Running tasks + 1, GPUs held + ``gpu_count`` and GPU memory held +
   ``gpu_count * memory_mb`` must stay within the tenant's limits ("tenant acme at its
   GPU quota (8/8)"). A tenant missing from ``snapshot.tenants`` has no limits. A task
   blocked by its own tenant's quota blocks nobody else's tasks, but it is protected from
   its own tenant's later (narrower) tasks the way backfill protects a capacity-blocked
   task: the first quota-blocked task of a tenant that its quota could ever hold gets a
   *quota hold*, the earliest time T at which the ends of the tenant's running tasks
   (``expected_end``, and ``now + timeout_s`` of those placed earlier in the pass) free
   enough quota for it, and the headroom left beside it at T. A later task of that tenant
   may start only if it ends by T or fits in that headroom (which it then uses up);
   otherwise it waits with "held for task #N of the same tenant: it waits for quota...".
4. **Online/batch split.** Each class may hold ``round(share * schedulable GPUs)`` GPUs
   (counted as the GPUs its tasks hold; a shared allocation counts its GPU), e.g.
   "online share of the cluster full (70%): 7/7 GPUs in use". Strict by default; a share
   covering the whole cluster is no limit. With ``allow_borrowing`` a class may also use
   the other class's idle share (its cap minus what it holds); GPUs held beyond a
   class's own cap are *borrowed*. When a task of the owning class, within its own
   share, does not fit, running tasks of the borrowing class (never of higher priority
   than the task; only while that class is still over its cap) are preempted to give
   the GPUs back: reclaim comes before any priority preemption, and is expressed as
   ``Preemption`` entries with the reason "borrowed batch GPUs reclaimed for online
   task #N". A share-blocked task blocks nobody of the other class.
5. **Fit.** Per GPU, ``used = max(memory_claimed_mb, memory_used_live_mb)``. An exclusive
   task needs GPUs with no allocation at all where ``used + memory + safety margin <=
   total``; a shared task packs onto GPUs without an exclusive allocation while the same
   sum fits; ``memory_mb = None`` needs whole, empty GPUs (recorded as exclusive
   allocations of the GPU's total memory). A task's ``gpu_count`` GPUs go on ONE server,
   or nothing ("no server has 4 free GPUs with 40 GB; best has 3"). A gang across servers
   (``nodes`` > 1) gets ``gpu_count / nodes`` GPUs on each of ``nodes`` servers, all sharing
   the value of the label ``topology_key`` when it is set, or nothing ("no 2 servers with 8
   free GPUs with 70 GB sharing rack; best has 1"); it is placed exclusive, its
   ``Placement.ranks`` list the servers in rank order, and the backfill reservation and
   preemption below pick servers for it the same way (the cheapest group of servers).
6. **Score.** GPU score = model affinity (+100 when the task's model is loaded on it,
   +50 when its LRU cache has room: fewer than ``max_models_per_gpu`` models) + the
   load-balance score (free memory 40, utilisation 30, temperature 20, idle time 10,
   each normalised to 0..1; idle time counts whole minutes up to one hour). Servers
   where the task's model is loaded on a GPU it could use are tried first and win when
   they fit (the most such GPUs, then packing order, then score). Otherwise servers are
   visited by their count of empty GPUs: ``binpack`` starts from the fullest server that can
   still hold the task (whole servers stay free for big gangs; the free-memory term is
   inverted and shared tasks try servers already hosting shared work first, so they
   pack), ``spread`` from the emptiest. Among the first few fitting servers of that
   level the one whose best ``gpu_count`` GPUs score highest wins, and those GPUs are
   taken.
7. **Backfill (EASY).** The first task in queue order that is blocked by capacity (not
   by its quota, class share or constraints) and that could start once running tasks
   end gets a *reservation*: the earliest time T at which, replaying the running
   tasks' ``expected_end`` (and the ends, ``now + timeout_s``, of tasks placed earlier
   in this pass), it fits on one server, and the GPUs it would take there. A later
   task may start now only if it cannot delay that reservation: it ends by T
   (``now + timeout_s <= T``) or it uses none of the reserved GPUs (reclaim and
   preemption keep off them too). Otherwise it waits with "reserved for backfill: would
   delay task #N". Only that one reservation is
   kept (EASY backfill), so a big task at the head never starves and small tasks
   still fill the holes. With ``backfill`` off, once a task is blocked by capacity
   nothing behind it starts in this pass ("waiting behind N higher-priority tasks").
8. **Preemption** (off by default). When a task whose priority is listed in
   ``config.preemption`` is blocked by capacity, LOW batch running tasks on ONE server
   may be preempted to make room: the server needing the fewest victims wins (then the
   fewest GPUs freed), newest tasks are taken first, and victims that turn out
   unnecessary are spared. The plan lists a ``Preemption`` per victim ("preempted by
   CRITICAL task #N") and places the task on the freed GPUs. A preempted task's GPUs,
   tenant usage and class usage are given back in the working state; its live memory
   reading is assumed to drop by its claim.
9. **Booked reservations** (``snapshot.reservations``: approved windows of GPUs booked
   for one tenant). Inside a window only its tenant's tasks may use its GPUs; before
   it, another tenant's task may use them only if it ends by the start
   (``now + timeout_s <= starts_at``), so nothing can still hold them when the window
   opens. A task naming a reservation (``reservation_id``) runs only on its GPUs and only
   inside its window ("waiting for reservation paper-deadline, starts in 2 h"). The
   backfill reservation of rule 7 is computed on the GPUs the head task may use.
10. **Reasons.** Every task left pending gets a human-readable reason and its 1-based
   position among the tasks still pending after the pass, in queue order. Capacity
   reasons are stated against the state at the end of the pass.

Speed: servers sit in buckets by their count of empty GPUs, so an exclusive gang of
``n`` GPUs only visits servers with at least ``n`` empty GPUs (and enough memory on
one of them), and the scan stops after a few fitting servers. A "nothing fits this
request" answer (count, memory, mode, constraints, reservation) is remembered for the
rest of the pass, since capacity only shrinks between preemptions (a preemption
forgets them); so is "no victims help". "best has k" is computed once per request
kind at the end of the pass. ``bench/core.py`` measures the decision time per task.
"""

from __future__ import annotations

from collections.abc import Callable

from scheduling.placement.config import ConfigError, SchedulerConfig, parse_config
from scheduling.placement.order import fair_share_factors, queue_order, snapshot_order
from scheduling.placement.planner import Pass
from scheduling.placement.reasons import format_mb
from scheduling.placement.state import ColumnCache
from scheduling.placement.types import (
    GpuState,
    NodeState,
    PendingInfo,
    PendingTask,
    Placement,
    Plan,
    Preemption,
    ReservationWindow,
    RunningTask,
    Snapshot,
    TenantState,
)


def schedule(snapshot: Snapshot, on_place: Callable[[Placement], None] | None = None) -> Plan:
    """Decide placements, preemptions and pending reasons for one pass.

    ``on_place``, when given, is called with each placement as soon as it is decided, up to
    the pass's first preemption: those placements are final and none of them needs a GPU
    that a preemption frees, so a caller may write them while the pass goes on deciding.
    Every placement is in the returned plan either way."""
    return Pass(snapshot, on_place=on_place).run()


def schedule_timed(snapshot: Snapshot) -> tuple[Plan, list[float]]:
    """``schedule`` plus the seconds spent deciding each pending task (for bench/core.py)."""
    timings: list[float] = []
    plan = Pass(snapshot, timings).run()
    return plan, timings


__all__ = [
    "ColumnCache",
    "ConfigError",
    "GpuState",
    "NodeState",
    "Pass",
    "PendingInfo",
    "PendingTask",
    "Placement",
    "Plan",
    "Preemption",
    "ReservationWindow",
    "RunningTask",
    "SchedulerConfig",
    "Snapshot",
    "TenantState",
    "fair_share_factors",
    "format_mb",
    "parse_config",
    "queue_order",
    "schedule",
    "schedule_timed",
    "snapshot_order",
]
