"""The placement core: pure Python over plain objects, no ORM, no clock reads.

Entry point: ``schedule(snapshot: Snapshot) -> Plan`` (types in ``scheduling.core_types``).
The DB layer loads a ``Snapshot``, calls ``schedule`` and applies the ``Plan``:
preemptions first (the victims return to pending), then placements (allocation rows
record ``Placement.memory_mb`` and ``Placement.exclusive``), then the pending reasons and
queue positions. The input snapshot is never mutated.

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
   each normalised to 0..1; idle time saturates at one hour). Servers where the task's
   model is loaded on a GPU it could use are tried first and win when they fit (the
   most such GPUs, then packing order, then score). Otherwise servers are visited by
   their count of empty GPUs: ``binpack`` starts from the fullest server that can
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

import bisect
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from scheduling.core_types import (
    GpuState,
    PendingInfo,
    PendingTask,
    Placement,
    Plan,
    Preemption,
    RunningTask,
    Snapshot,
)

# Same values as tenants.choices.Priority; repeated here so the core imports no Django models.
PRIORITY_NAMES = {0: "LOW", 1: "NORMAL", 2: "HIGH", 3: "CRITICAL"}
LOW = 0

# How many fitting servers of the first fitting level are compared by score before the
# scan stops: enough for the load-balance score to matter, few enough to stay in microseconds.
SCAN_LIMIT = 3
# Servers holding the task's model examined before falling back to the plain scan.
AFFINITY_SCAN_LIMIT = 12
# Task.pending_reason holds 500 characters; a long label selector must not overflow it.
MAX_REASON_CHARS = 500
# Capacity-blocked tasks tried for the backfill reservation before giving up in a pass.
MAX_RESERVE_ATTEMPTS = 8
# Idle time beyond this counts as fully idle in the load-balance score.
IDLE_SATURATION_S = 3600.0

# Fit modes of a request.
EXCLUSIVE = "x"
SHARED = "s"
WHOLE = "w"
# First item of a gang's shape (a single-server shape starts with its GPU count).
GANG = "gang"


def schedule(snapshot: Snapshot) -> Plan:
    """Decide placements, preemptions and pending reasons for one pass."""
    return _Pass(snapshot).run()


def schedule_timed(snapshot: Snapshot) -> tuple[Plan, list[float]]:
    """``schedule`` plus the seconds spent deciding each pending task (for bench/core.py)."""
    timings: list[float] = []
    plan = _Pass(snapshot, timings).run()
    return plan, timings


def queue_order(tasks: Iterable[PendingTask], factors: dict[int, float] | None = None) -> list[PendingTask]:
    """Priority first (higher first), then the tenant's fair-share factor (higher first) when
    ``factors`` is given, then FIFO by creation time, then id."""
    if not factors:
        return sorted(tasks, key=lambda t: (-t.priority, t.created_at, t.id))
    return sorted(tasks, key=lambda t: (-t.priority, -factors.get(t.tenant_id, 1.0), t.created_at, t.id))


def fair_share_factors(snapshot: Snapshot) -> dict[int, float] | None:
    """Tenant id -> fair-share factor when the policy is on, else None."""
    if not snapshot.config.fair_share:
        return None
    return {tid: t.fair_share for tid, t in snapshot.tenants.items()}


def snapshot_order(snapshot: Snapshot) -> list[PendingTask]:
    """The order a pass takes the snapshot's pending tasks in."""
    return queue_order(snapshot.pending, fair_share_factors(snapshot))


def format_mb(mb: int) -> str:
    if mb and mb % 1000 == 0:
        return f"{mb // 1000} GB"
    return f"{mb} MB"


def _duration(delta: timedelta) -> str:
    """"2 h", "45 min", "3 d 4 h": how long until a reservation starts."""
    minutes = max(1, int(delta.total_seconds() // 60))
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h" + (f" {minutes % 60} min" if minutes % 60 and hours < 3 else "")
    return f"{hours // 24} d" + (f" {hours % 24} h" if hours % 24 else "")


def _utc(when: datetime) -> str:
    return f"{(when.astimezone(UTC) if when.tzinfo else when):%Y-%m-%d %H:%M} UTC"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class _Reservation:
    __slots__ = ("gpus", "nodes", "task_id", "time")

    def __init__(self, task_id: int, when: datetime, nodes: tuple[int, ...], gpus: frozenset[int]) -> None:
        self.task_id = task_id
        self.time = when
        self.nodes = nodes  # one server, or a gang's servers
        self.gpus = gpus


class _QuotaHold:
    """A quota-blocked task's claim on its tenant's future headroom (rule 3).

    ``time``: the earliest moment the tenant's running tasks (and those placed earlier in the
    pass) will have freed enough quota for it; ``spare``: what the tenant may still hold at
    that moment beside it (GPUs, memory, running tasks). A later task of the tenant that
    would still run at ``time`` must fit in ``spare`` and uses it up.
    """

    __slots__ = ("spare", "task_id", "time")

    def __init__(self, task_id: int, when: datetime, spare: list[int]) -> None:
        self.task_id = task_id
        self.time = when
        self.spare = spare


class _Pass:
    def __init__(self, snapshot: Snapshot, timings: list[float] | None = None) -> None:
        self.snap = snapshot
        self.timings = timings
        cfg = snapshot.config
        self.cfg = cfg
        self.margin = cfg.memory_safety_margin_mb
        self.max_models = cfg.max_models_per_gpu
        self.binpack = cfg.strategy != "spread"
        self.now = snapshot.now
        self.plan = Plan()

        # GPUs as parallel lists indexed by a dense internal index: attribute access on
        # lists of ints is what keeps the inner loops fast.
        self.g_id: list[int] = []
        self.g_node: list[int] = []
        self.g_total: list[int] = []
        self.g_claimed: list[int] = []
        self.g_live: list[int] = []
        self.g_excl: list[bool] = []
        self.g_shared: list[int] = []
        self.g_models: list[Iterable[str]] = []
        self.g_model_lower: list[str] = []
        self.g_static: list[float] = []  # utilisation + temperature + idle part of the score
        self.gpu_index: dict[int, int] = {}

        self.n_id: list[int] = []
        self.n_name: list[str] = []
        self.n_labels: list[dict[str, str]] = []
        self.n_ok: list[bool] = []
        self.n_gpus: list[tuple[int, ...]] = []  # schedulable GPUs of an active server
        self.n_free: list[int] = []  # empty schedulable GPUs

        now = snapshot.now
        max_gpus = 0
        schedulable_total = 0
        for node in snapshot.nodes:
            n = len(self.n_id)
            self.n_id.append(node.id)
            self.n_name.append(node.name)
            self.n_labels.append(node.labels or {})
            self.n_ok.append(bool(node.schedulable))
            ok_gpus: list[int] = []
            free = 0
            for gpu in node.gpus:
                g = len(self.g_id)
                self._add_gpu(gpu, n, now)
                if node.schedulable and gpu.schedulable:
                    ok_gpus.append(g)
                    if self._empty(g):
                        free += 1
            self.n_gpus.append(tuple(ok_gpus))
            self.n_free.append(free)
            schedulable_total += len(ok_gpus)
            max_gpus = max(max_gpus, len(ok_gpus))

        self.schedulable_total = schedulable_total
        # Active servers with at least one GPU hosting shared allocations: n -> count of such GPUs.
        self.shared_nodes: dict[int, int] = {}
        for n, gl in enumerate(self.n_gpus):
            k = sum(1 for g in gl if self.g_shared[g] and not self.g_excl[g])
            if k and self.n_ok[n]:
                self.shared_nodes[n] = k
        self.g_base: list[float] = [self._base_score(g) for g in range(len(self.g_id))]
        # Per server, the most memory an exclusive request can get on one of its empty GPUs:
        # lets the scan skip servers whose GPUs are too small without looking at each GPU.
        self.n_room: list[int] = [self._room(n) for n in range(len(self.n_id))]
        # Per server, its empty schedulable GPUs best score first (exclusive requests without a model).
        self.n_sorted: list[list[int]] = [self._sorted_empty(n) for n in range(len(self.n_id))]
        # buckets[k]: active servers with exactly k empty GPUs (dicts keep a stable order).
        self.max_k = max_gpus
        self.buckets: list[dict[int, None]] = [{} for _ in range(max_gpus + 1)]
        for n, ok in enumerate(self.n_ok):
            if ok and self.n_gpus[n]:
                self.buckets[self.n_free[n]][n] = None

        # Affinity indexes: model -> servers with a schedulable GPU holding it (shared requests),
        # and model -> {server: empty GPUs holding it} (exclusive requests need an empty GPU).
        self.model_nodes: dict[str, dict[int, None]] = {}
        self.model_free: dict[str, dict[int, int]] = {}
        for n, gl in enumerate(self.n_gpus):
            if not self.n_ok[n]:
                continue
            for g in gl:
                empty = self._empty(g)
                for model in self.g_models[g]:
                    self.model_nodes.setdefault(model, {})[n] = None
                    if empty:
                        self._count_free_holder(model, n, 1)

        # Tenant usage, updated as the plan places and preempts.
        self.t_usage: dict[int, list[int]] = {
            tid: [t.used_gpus, t.used_gpu_memory_mb, t.running_tasks] for tid, t in snapshot.tenants.items()
        }

        # Online/batch split.
        self.class_cap = {
            "online": int(cfg.online_share * schedulable_total + 0.5),
            "batch": int(cfg.batch_share * schedulable_total + 0.5),
        }
        self.class_share = {"online": cfg.online_share, "batch": cfg.batch_share}
        self.class_used = {"online": 0, "batch": 0}
        for r in snapshot.running:
            if r.workload_class in self.class_used:
                self.class_used[r.workload_class] += len(r.gpu_ids)
        self.running: dict[int, RunningTask] = {r.id: r for r in snapshot.running}
        # Tasks placed in this pass: (timeout_s, node, gpus, memory, exclusive), for the reservation.
        self.placed_ends: list[tuple] = []

        self.preempt_allowed = {p for p, name in PRIORITY_NAMES.items() if name in set(cfg.preemption)}

        # Pass-level caches.
        self.elig_cache: dict[tuple, dict[int, tuple[int, ...]]] = {}
        self.static_cache: dict[tuple, str] = {}
        self.nofit: set[tuple] = set()
        self.novictims: set[tuple] = set()
        self.victim_pools: dict[str, dict[int, list[RunningTask]]] = {}
        self.best_cache: dict[tuple, int] = {}
        self.sig_cache: dict[tuple, set[tuple[int, ...]]] = {}
        self.smallest_cache: dict[tuple, int] = {}
        self.reservation: _Reservation | None = None
        # Quota holds (rule 3): tenant id -> the hold of its first quota-blocked task.
        self.quota_holds: dict[int, _QuotaHold | None] = {}
        # Per tenant, tasks placed in this pass: (timeout_s, gpus, memory): their ends, for quota holds.
        self.placed_by_tenant: dict[int, list[tuple[int, int, int]]] = {}
        # Booked reservations still open or upcoming at ``now`` (see _booked_for).
        self.windows = [w for w in snapshot.reservations if w.ends_at > snapshot.now]
        self.window_by_id = {w.id: w for w in self.windows}
        self.booked_cache: dict[tuple, frozenset[int]] = {}

    # ------------------------------------------------------------------ setup helpers

    def _add_gpu(self, gpu: GpuState, n: int, now) -> None:
        g = len(self.g_id)
        self.gpu_index[gpu.id] = g
        self.g_id.append(gpu.id)
        self.g_node.append(n)
        self.g_total.append(gpu.memory_total_mb)
        self.g_claimed.append(gpu.memory_claimed_mb)
        self.g_live.append(gpu.memory_used_live_mb)
        self.g_excl.append(bool(gpu.exclusive_taken))
        self.g_shared.append(gpu.shared_count)
        # Kept as the snapshot's dict until a placement adds a model (copy on write).
        self.g_models.append(gpu.loaded_models or ())
        self.g_model_lower.append((gpu.model_name or "").lower())
        util = min(max(gpu.utilization_pct, 0), 100) / 100.0
        temp = min(max(gpu.temperature_c, 0), 100) / 100.0
        idle = 0.0
        if gpu.idle_since is not None:
            idle = min(max((now - gpu.idle_since).total_seconds(), 0.0), IDLE_SATURATION_S) / IDLE_SATURATION_S
        self.g_static.append(30.0 * (1.0 - util) + 20.0 * (1.0 - temp) + 10.0 * idle)

    def _count_free_holder(self, model: str, n: int, delta: int) -> None:
        counts = self.model_free.setdefault(model, {})
        k = counts.get(n, 0) + delta
        if k > 0:
            counts[n] = k
        else:
            counts.pop(n, None)

    def _sorted_empty(self, n: int) -> list[int]:
        base = self.g_base
        return sorted((g for g in self.n_gpus[n] if self._empty(g)), key=lambda g: (-base[g], g))

    def _room(self, n: int) -> int:
        room = -1
        for g in self.n_gpus[n]:
            if not self.g_excl[g] and not self.g_shared[g] and not self.g_claimed[g]:
                r = self.g_total[g] - self.g_live[g]
                if r > room:
                    room = r
        return room

    def _empty(self, g: int) -> bool:
        return not self.g_excl[g] and self.g_shared[g] == 0 and self.g_claimed[g] == 0

    # ------------------------------------------------------------------ the pass

    def run(self) -> Plan:
        factors = fair_share_factors(self.snap)
        queue = queue_order(self.snap.pending, factors)
        timings = self.timings
        blocked: dict[int, tuple] = {}  # task id -> shape, for capacity reasons at the end
        reasons: dict[int, str] = {}
        never: set[int] = set()  # tasks no active server could hold even when idle
        head: PendingTask | None = None  # first task blocked by capacity that can ever fit
        waiting_higher = 0  # blocked tasks ahead, strictly higher priority than the current level
        waiting_total = 0
        level = None
        waiting_before_level = 0
        clock = time.perf_counter
        reserve_attempts = 0
        for task in queue:
            t0 = clock() if timings is not None else 0.0
            if task.priority != level:
                level = task.priority
                waiting_before_level = waiting_total
            waiting_higher = waiting_before_level
            outcome = self._decide(task, head, waiting_higher, waiting_total)
            if outcome is not None:
                kind, value = outcome
                if kind == "reason":
                    reasons[task.id] = value
                elif kind == "never":
                    reasons[task.id] = value
                    never.add(task.id)
                elif kind == "wait":
                    reasons[task.id] = value
                    waiting_total += 1
                else:  # "capacity": value is the shape
                    blocked[task.id] = value
                    waiting_total += 1
                    if head is None:
                        if self.cfg.backfill:
                            # A task that cannot fit even once everything running ends gets no
                            # reservation; try a few before giving up so this stays cheap.
                            if self.reservation is None and reserve_attempts < MAX_RESERVE_ATTEMPTS:
                                reserve_attempts += 1
                                if value[0] == GANG:
                                    self.reservation = self._reserve_gang(task, value)
                                else:
                                    booked = self._booked_for(task) if self.windows else None
                                    self.reservation = self._reserve(
                                        task, value, booked if isinstance(booked, frozenset) else None)
                                if self.reservation is not None:
                                    head = task
                        else:
                            head = task
            if timings is not None:
                timings.append(clock() - t0)

        # Capacity reasons against the final state, once per shape.
        shape_reason: dict[tuple, str] = {}
        for tid, shape in blocked.items():
            r = shape_reason.get(shape)
            if r is None:
                r = shape_reason[shape] = self._capacity_reason(shape)
            if self.reservation is not None and tid == self.reservation.task_id:
                res = self.reservation
                # Running tasks may end sooner than their timeouts; T is the latest it should wait.
                when = res.time.astimezone(UTC) if res.time.tzinfo else res.time
                where = ", ".join(self.n_name[n] for n in res.nodes)
                r += (f"; next in line: GPUs reserved on {where}, "
                      f"free by {when:%Y-%m-%d %H:%M} UTC at the latest")
            reasons[tid] = r
        if factors:
            self._explain_fair_share(queue, factors, reasons, set(blocked))

        position = 0
        pending = self.plan.pending
        for task in queue:
            r = reasons.get(task.id)
            if r is not None:
                position += 1
                pending[task.id] = PendingInfo(reason=r[:MAX_REASON_CHARS], position=position,
                                               never_fits=task.id in never)
        return self.plan

    def _explain_fair_share(self, queue: list[PendingTask], factors: dict[int, float], reasons: dict[int, str],
                            blocked: set[int]) -> None:
        """Say so when fair share let a later task of a tenant with a higher factor go first."""
        placed_ids = {p.task_id for p in self.plan.placements}
        # Per priority: placed tasks by factor (highest first) with the latest (created_at, id)
        # among those of at least that factor, so each waiting task is one bisect.
        levels: dict[int, list[tuple[float, tuple]]] = {}
        for t in queue:
            if t.id in placed_ids:
                levels.setdefault(t.priority, []).append((factors.get(t.tenant_id, 1.0), (t.created_at, t.id)))
        latest: dict[int, tuple[list[float], list[tuple]]] = {}
        for prio, items in levels.items():
            items.sort(key=lambda x: -x[0])
            keys, running_max, best = [], [], None
            for factor, when in items:
                best = when if best is None or when > best else best
                keys.append(-factor)
                running_max.append(best)
            latest[prio] = (keys, running_max)
        for t in queue:
            r = reasons.get(t.id)
            if r is None or t.priority not in latest or not (t.id in blocked or r.startswith("reserved for backfill")):
                continue
            keys, running_max = latest[t.priority]
            own = factors.get(t.tenant_id, 1.0)
            k = bisect.bisect_left(keys, -own)  # placed tasks with a strictly higher factor
            if k and running_max[k - 1] > (t.created_at, t.id):
                tenant = self.snap.tenants.get(t.tenant_id)
                name = tenant.slug if tenant is not None else f"#{t.tenant_id}"
                reasons[t.id] = (f"{r}; fair share: tasks of tenants with a higher factor went first "
                                 f"(tenant {name}: {own:.2f})")

    def _decide(self, task: PendingTask, head: PendingTask | None, waiting_higher: int,
                waiting_total: int) -> tuple[str, object] | None:
        """None when placed; ("reason", text), ("wait", text) or ("capacity", shape)."""
        if task.nodes > 1:
            return self._decide_gang(task, head, waiting_higher, waiting_total)
        c = task.gpu_count
        mem = task.memory_mb
        if c < 1 or (mem is not None and mem < 0):
            return ("reason", f"asks for {c} GPUs with {mem} MB each: nothing to place")
        if mem is None:
            mode = WHOLE
        elif task.exclusive:
            mode = EXCLUSIVE
        else:
            mode = SHARED

        sel = task.node_selector
        ckey = (tuple(sorted((str(k), str(v)) for k, v in sel.items())) if sel else (),
                task.gpu_model or "")
        elig = self.elig_cache.get(ckey)
        if elig is None:
            elig = self.elig_cache[ckey] = self._eligible(ckey)
        shape = (c, mem if mem is not None else 0, mode, ckey)
        r = self.static_cache.get(shape)
        if r is None:
            r = self.static_cache[shape] = self._static_reason(shape, elig)
        if r:
            return ("never", r)
        r = self._quota_reason(task, c, mem)
        if r is None and mode == WHOLE:
            # A whole GPU claims its total memory: check the smallest it could get before any
            # search (or preemption) is spent on it; the GPUs actually chosen are checked below.
            smallest = self.smallest_cache.get(ckey)
            if smallest is None:
                total = self.g_total
                smallest = self.smallest_cache[ckey] = min(total[g] for gl in elig.values() for g in gl)
            r = self._memory_quota_reason(task, c * smallest)
        if r is not None:
            if task.tenant_id not in self.quota_holds:
                self.quota_holds[task.tenant_id] = self._quota_hold(task, c, mem, ckey)
            return ("reason", r)
        hold = self.quota_holds.get(task.tenant_id)
        if hold is not None and not self._fits_hold(task, c, mem, hold, ckey):
            return ("reason", f"held for task #{hold.task_id} of the same tenant: it waits for quota, "
                              f"and this task would still hold it at {self._hhmm(hold.time)} UTC")
        r = self._share_reason(task, c)
        if r is not None:
            return ("reason", r)

        if head is not None and not self.cfg.backfill:
            if waiting_higher == waiting_total:
                return ("wait", f"waiting behind {_plural(waiting_total, 'higher-priority task')}")
            return ("wait", f"waiting behind {_plural(waiting_total, 'earlier task')} in the queue "
                            f"({waiting_higher} of higher priority)")

        # Booked reservations first (GPUs this task may not use), then the backfill reservation.
        booked = self._booked_for(task) if self.windows or task.reservation_id is not None else None
        if isinstance(booked, str):
            return ("reason", booked)
        excluded: frozenset[int] | None = booked
        res = self.reservation
        if res is not None and self._ends_after(task, res):
            excluded = res.gpus if booked is None else self._union(booked, res.gpus)

        found = self._search(task, c, mem, mode, shape, elig, excluded, None)
        if found is None:
            # Reclaim and preemption keep off the reserved GPUs too.
            found = self._reclaim_or_preempt(task, c, mem, mode, shape, elig, excluded)
        if found is None:
            if excluded is not booked and self._search(task, c, mem, mode, shape, elig, booked, None) is not None:
                return ("reason", f"reserved for backfill: would delay task #{res.task_id}")
            if booked is not None and task.reservation_id is None and self._search(
                    task, c, mem, mode, shape, elig, None, None) is not None:
                return ("reason", self._booked_reason(task))
            if booked is not None and task.reservation_id is not None:
                w = self.window_by_id[task.reservation_id]
                return ("reason", f"waiting for GPUs of reservation {w.name} (in use)")
            return ("capacity", shape)

        n, gpus = found
        if mode == WHOLE:
            per_gpu = min(self.g_total[g] for g in gpus)
            r = self._memory_quota_reason(task, c * per_gpu)
            if r is not None:
                return ("reason", r)
        else:
            per_gpu = mem
        if hold is not None and not self._ends_by(task, hold.time):
            hold.spare[0] -= c
            hold.spare[1] -= c * per_gpu
            hold.spare[2] -= 1
        self._place(task, n, gpus, per_gpu, mode)
        return None

    def _ends_by(self, task: PendingTask, when: datetime) -> bool:
        return self.now + timedelta(seconds=task.timeout_s) <= when

    @staticmethod
    def _hhmm(when: datetime) -> str:
        return f"{(when.astimezone(UTC) if when.tzinfo else when):%Y-%m-%d %H:%M}"

    def _need_mb(self, c: int, mem: int | None, ckey: tuple) -> int:
        # A whole-GPU request claims at least the smallest GPU it could get.
        return c * (mem if mem is not None else self.smallest_cache.get(ckey, 0))

    def _fits_hold(self, task: PendingTask, c: int, mem: int | None, hold: _QuotaHold, ckey: tuple) -> bool:
        if self._ends_by(task, hold.time):
            return True
        spare = hold.spare
        return c <= spare[0] and self._need_mb(c, mem, ckey) <= spare[1] and spare[2] >= 1

    def _quota_hold(self, task: PendingTask, c: int, mem: int | None, ckey: tuple) -> _QuotaHold | None:
        """When ``task``'s tenant will have freed enough quota for it, replaying the ends of its
        running tasks; None when its quota could never hold it (then it protects nothing)."""
        tenant = self.snap.tenants.get(task.tenant_id)
        if tenant is None:
            return None
        need = (c, self._need_mb(c, mem, ckey), 1)
        limits = (tenant.max_gpus, tenant.max_gpu_memory_mb, tenant.max_running_tasks)
        if any(n > lim for n, lim in zip(need, limits, strict=True)):
            return None
        used = list(self.t_usage[task.tenant_id])
        ends = [(r.expected_end, len(r.gpu_ids), r.memory_mb * len(r.gpu_ids))
                for r in self.running.values() if r.tenant_id == task.tenant_id]
        ends += [(self.now + timedelta(seconds=t), k, m) for t, k, m in self.placed_by_tenant.get(task.tenant_id, ())]
        ends.sort(key=lambda e: e[0])
        for when, gpus, memory in ends:
            used[0] -= gpus
            used[1] -= memory
            used[2] -= 1
            if all(u + n <= lim for u, n, lim in zip(used, need, limits, strict=True)):
                return _QuotaHold(task.id, when, [lim - u - n for u, n, lim in zip(used, need, limits, strict=True)])
        return None

    # ------------------------------------------------------------------ booked reservations
    #
    # An approved reservation (``snapshot.reservations``) books GPUs for one tenant over
    # [starts_at, ends_at). Inside the window only that tenant's tasks may use them; before
    # it, another tenant's task may use them only if it ends (by its timeout) by the start,
    # so nothing can still hold them when the window opens. A task that names a reservation
    # runs only on its GPUs and only inside its window.

    def _booked_for(self, task: PendingTask) -> frozenset[int] | str | None:
        """GPUs (internal indexes) this task must keep off, None for none, or a reason to wait."""
        now = self.now
        if task.reservation_id is not None:
            w = self.window_by_id.get(task.reservation_id)
            if w is None:
                return f"reservation #{task.reservation_id} is not active (over, released or not approved)"
            if w.tenant_id != task.tenant_id:
                return f"reservation {w.name} belongs to another tenant"
            if now < w.starts_at:
                return f"waiting for reservation {w.name}, starts in {_duration(w.starts_at - now)}"
            key: tuple = ("only", w.id)
            hit = self.booked_cache.get(key)
            if hit is None:
                own = self._window_gpus(w)
                hit = self.booked_cache[key] = frozenset(g for g in range(len(self.g_id)) if g not in own)
            return hit
        end = now + timedelta(seconds=task.timeout_s)
        blocking = tuple(w.id for w in self.windows
                         if w.tenant_id != task.tenant_id and (w.starts_at <= now or end > w.starts_at))
        if not blocking:
            return None
        hit = self.booked_cache.get(blocking)
        if hit is None:
            gpus: set[int] = set()
            for wid in blocking:
                gpus |= self._window_gpus(self.window_by_id[wid])
            hit = self.booked_cache[blocking] = frozenset(gpus)
        return hit

    def _window_gpus(self, w) -> frozenset[int]:
        index = self.gpu_index
        return frozenset(index[g] for g in w.gpu_ids if g in index)

    def _union(self, a: frozenset[int], b: frozenset[int]) -> frozenset[int]:
        key = ("union", id(a), id(b))
        hit = self.booked_cache.get(key)
        if hit is None:
            hit = self.booked_cache[key] = a | b
        return hit

    def _booked_reason(self, task: PendingTask) -> str:
        now = self.now
        end = now + timedelta(seconds=task.timeout_s)
        for w in self.windows:
            if w.tenant_id == task.tenant_id:
                continue
            if w.starts_at <= now:
                return f"free GPUs are booked by reservation {w.name} until {_utc(w.ends_at)}"
            if end > w.starts_at:
                return (f"free GPUs are booked by reservation {w.name} from {_utc(w.starts_at)}; "
                        f"this task's timeout would run past that")
        return "free GPUs are booked by reservations"

    def _ends_after(self, task: PendingTask, res: _Reservation) -> bool:
        return self.now + timedelta(seconds=task.timeout_s) > res.time

    # ------------------------------------------------------------------ quotas

    def _quota_reason(self, task: PendingTask, c: int, mem: int | None) -> str | None:
        tenant = self.snap.tenants.get(task.tenant_id)
        if tenant is None:
            return None
        used_gpus, _used_mem, running = self.t_usage[task.tenant_id]
        slug = tenant.slug
        if running + 1 > tenant.max_running_tasks:
            return f"tenant {slug} at its running-task quota ({running}/{tenant.max_running_tasks})"
        if used_gpus + c > tenant.max_gpus:
            if used_gpus >= tenant.max_gpus:
                return f"tenant {slug} at its GPU quota ({used_gpus}/{tenant.max_gpus})"
            return (f"tenant {slug} near its GPU quota ({used_gpus}/{tenant.max_gpus}); "
                    f"this task needs {c} more")
        if mem is not None:
            return self._memory_quota_reason(task, c * mem)
        return None

    def _memory_quota_reason(self, task: PendingTask, need_mb: int) -> str | None:
        tenant = self.snap.tenants.get(task.tenant_id)
        if tenant is None:
            return None
        used_mem = self.t_usage[task.tenant_id][1]
        if used_mem + need_mb <= tenant.max_gpu_memory_mb:
            return None
        if used_mem >= tenant.max_gpu_memory_mb:
            return (f"tenant {tenant.slug} at its GPU memory quota "
                    f"({format_mb(used_mem)}/{format_mb(tenant.max_gpu_memory_mb)})")
        return (f"tenant {tenant.slug} near its GPU memory quota "
                f"({format_mb(used_mem)}/{format_mb(tenant.max_gpu_memory_mb)}); "
                f"this task needs {format_mb(need_mb)} more")

    def _other(self, cls: str) -> str:
        return "batch" if cls == "online" else "online"

    def _share_limit(self, cls: str) -> int:
        cap = self.class_cap[cls]
        if self.cfg.allow_borrowing:
            other = self._other(cls)
            cap += max(0, self.class_cap[other] - self.class_used[other])
        return cap

    def _share_reason(self, task: PendingTask, c: int) -> str | None:
        cls = task.workload_class
        if cls not in self.class_cap:
            return None
        used = self.class_used[cls]
        limit = self._share_limit(cls)
        if used + c <= limit or self.class_share[cls] >= 1.0:
            # A share of the whole cluster is no limit: capacity will say why it waits.
            return None
        pct = f"{self.class_share[cls] * 100:.0f}%"
        r = f"{cls} share of the cluster full ({pct}): {used}/{self.class_cap[cls]} GPUs in use"
        if used < self.class_cap[cls]:
            r += f", this task needs {c}"
        if self.cfg.allow_borrowing:
            r += f", and the {self._other(cls)} share has no idle GPUs to lend"
        return r

    # ------------------------------------------------------------------ constraints

    def _eligible(self, ckey: tuple) -> dict[int, tuple[int, ...]]:
        """Active servers matching the labels, with their schedulable GPUs of the model."""
        selector, model = ckey
        out: dict[int, tuple[int, ...]] = {}
        for n, gl in enumerate(self.n_gpus):
            if not self.n_ok[n] or not gl:
                continue
            if selector:
                labels = self.n_labels[n]
                if any(str(labels.get(k)) != v or k not in labels for k, v in selector):
                    continue
            if model:
                wanted = model.lower()
                gl = tuple(g for g in gl if wanted in self.g_model_lower[g])
                if not gl:
                    continue
            out[n] = gl
        return out

    def _constraint_text(self, ckey: tuple) -> str:
        selector, model = ckey
        parts = []
        if selector:
            parts.append("labels " + ", ".join(f"{k}={v}" for k, v in selector))
        if model:
            parts.append(f"gpu_model '{model}'")
        return f" ({'; '.join(parts)})" if parts else ""

    def _static_reason(self, shape: tuple, elig: dict[int, tuple[int, ...]]) -> str:
        """Why no active server could ever hold this shape ("" when one could)."""
        c, mem, mode, ckey = shape
        selector, model = ckey
        if not elig:
            if selector and not self._eligible((selector, "")):
                labels = ", ".join(f"{k}={v}" for k, v in selector)
                return f"no active server has labels {labels}"
            if model:
                where = "no active server"
                if selector:
                    where += " with labels " + ", ".join(f"{k}={v}" for k, v in selector)
                return f"{where} has GPUs matching gpu_model '{model}'"
            return "no active server has schedulable GPUs"
        suffix = self._constraint_text(ckey)
        # Servers reduced to the memory each GPU offers when idle (sorted, largest first): few
        # distinct signatures per cluster. An idle GPU still uses some memory (driver, context):
        # a server's baseline is the least any of its empty GPUs reports now (0 if none is empty).
        sigs = self.sig_cache.get(ckey)
        if sigs is None:
            total = self.g_total
            sigs = set()
            for gl in elig.values():
                base = self._idle_baseline(gl)
                sigs.add(tuple(sorted((total[g] - base for g in gl), reverse=True)))
            self.sig_cache[ckey] = sigs
        largest = max(len(sig) for sig in sigs)
        if largest < c:
            return f"no active server has {_plural(c, 'GPU')}{suffix}; the largest has {largest}"
        need = self.margin + (mem if mode != WHOLE else 0)
        best = max(sum(1 for t in sig if t >= need) for sig in sigs)
        if best < c:
            margin = f" + the {format_mb(self.margin)} safety margin" if self.margin else ""
            what = f"{format_mb(mem)}{margin}" if mode != WHOLE else f"room after the {format_mb(self.margin)} margin"
            base = max((self._idle_baseline(gl) for gl in elig.values()), default=0)
            idle = f" (idle GPUs already use up to {format_mb(base)})" if base else ""
            return (f"no active server has {_plural(c, 'GPU')} with {what}{suffix}{idle}; "
                    f"the best has {best}")
        return ""

    def _idle_baseline(self, gl: tuple[int, ...]) -> int:
        """Memory a server's GPUs use with nothing on them: the least its empty GPUs report."""
        live = [self.g_live[g] for g in gl if self._empty(g)]
        return min(live) if live else 0

    def _best_count(self, mem: int, mode: str, ckey: tuple) -> int:
        """Most GPUs this request could get on one server now (memoised per request within the pass end)."""
        key = (mem, mode, ckey)
        best = self.best_cache.get(key)
        if best is not None:
            return best
        elig = self.elig_cache[ckey]
        best = 0
        if mode == SHARED:
            for gl in elig.values():
                k = len(self._qualifying(gl, mem, mode, None))
                if k > best:
                    best = k
        else:
            # Exclusive GPUs must be empty: a server with k empty GPUs offers at most k, so
            # walk the buckets from the emptiest down and stop once no bucket can beat the best.
            for k_free in range(self.max_k, 0, -1):
                if k_free <= best:
                    break
                for n in self.buckets[k_free]:
                    gl = elig.get(n)
                    if gl is not None:
                        k = len(self._qualifying(gl, mem, mode, None))
                        if k > best:
                            best = k
                            if best >= k_free:
                                break
        self.best_cache[key] = best
        return best

    def _capacity_reason(self, shape: tuple) -> str:
        if shape[0] == GANG:
            return self._gang_capacity_reason(shape)
        c, mem, mode, ckey = shape
        best = self._best_count(mem, mode, ckey)
        suffix = self._constraint_text(ckey)
        if mode == EXCLUSIVE:
            what = f"{_plural(c, 'free GPU')} with {format_mb(mem)}"
        elif mode == WHOLE:
            what = f"{_plural(c, 'empty GPU')}"
        else:
            what = f"{_plural(c, 'GPU')} with {format_mb(mem)} free to share"
        if best >= c:
            # Capacity came back later in the pass (a preemption): say what happened at its turn.
            return f"no server had {what}{suffix} at its turn; capacity freed later went to other tasks"
        return f"no server has {what}{suffix}; best has {best}"

    # ------------------------------------------------------------------ fit and score

    def _base_score(self, g: int) -> float:
        """Load-balance score of a GPU (0..100); binpack inverts the free-memory term."""
        total = self.g_total[g]
        claimed = self.g_claimed[g]
        live = self.g_live[g]
        used = claimed if claimed > live else live
        free_ratio = (total - used) / total if total > 0 else 0.0
        if free_ratio < 0:
            free_ratio = 0.0
        if self.binpack:
            free_ratio = 1.0 - free_ratio
        return 40.0 * free_ratio + self.g_static[g]

    def _gpu_score(self, g: int, model: str) -> float:
        score = self.g_base[g]
        if model:
            models = self.g_models[g]
            if model in models:
                score += 100.0
            elif len(models) < self.max_models:
                score += 50.0
        return score

    def _pick(self, q: list[int], c: int, model: str) -> tuple[float, tuple[int, ...]]:
        """The best ``c`` GPUs of ``q`` (all fit, in index order) and their summed score.

        Ties go to the lower index: ``max`` keeps the first maximum and the sorts are stable.
        """
        if model:
            # _gpu_score inlined: this runs for every server compared for a task with a model.
            base = self.g_base
            g_models = self.g_models
            room = self.max_models
            scores = {}
            for g in q:
                models = g_models[g]
                scores[g] = base[g] + (100.0 if model in models else 50.0 if len(models) < room else 0.0)
            key = scores.__getitem__
        else:
            scores = self.g_base
            key = scores.__getitem__
        if len(q) == c:
            return sum(map(key, q)), tuple(q)
        if c == 1:
            g = max(q, key=key)
            return key(g), (g,)
        ranked = sorted(q, key=key, reverse=True)[:c]
        return sum(map(key, ranked)), tuple(sorted(ranked))

    def _qualifying(self, gl: tuple[int, ...], mem: int, mode: str, excluded: frozenset[int] | None) -> list[int]:
        g_excl = self.g_excl
        g_total = self.g_total
        g_live = self.g_live
        g_claimed = self.g_claimed
        margin = self.margin
        out = []
        if mode == SHARED:
            for g in gl:
                if g_excl[g] or (excluded is not None and g in excluded):
                    continue
                claimed = g_claimed[g]
                live = g_live[g]
                if (claimed if claimed > live else live) + mem + margin <= g_total[g]:
                    out.append(g)
        else:
            g_shared = self.g_shared
            for g in gl:
                if g_excl[g] or g_shared[g] or g_claimed[g] or (excluded is not None and g in excluded):
                    continue
                if g_live[g] + mem + margin <= g_total[g]:
                    out.append(g)
        return out

    def _search(self, task: PendingTask, c: int, mem: int | None, mode: str, shape: tuple,
                elig: dict[int, tuple[int, ...]], excluded: frozenset[int] | None,
                only_node: int | None) -> tuple[int, tuple[int, ...]] | None:
        need = mem if mem is not None else 0
        model = task.model_name
        if only_node is not None:
            gl = elig.get(only_node)
            if not gl:
                return None
            q = self._qualifying(gl, need, mode, excluded)
            if len(q) < c:
                return None
            return only_node, self._pick(q, c, model)[1]

        key = (shape, id(excluded) if excluded is not None else 0)
        if key in self.nofit:
            return None

        lo = c if mode != SHARED else 0
        levels = range(lo, self.max_k + 1) if self.binpack else range(self.max_k, lo - 1, -1)

        # Affinity first: servers where the model is loaded on a GPU this request could use.
        if model:
            holders = (self.model_nodes if mode == SHARED else self.model_free).get(model)
            if holders:
                g_models = self.g_models
                n_free = self.n_free
                n_room = self.n_room
                room_needed = need + self.margin
                budget = AFFINITY_SCAN_LIMIT
                fits = 0
                best = None
                best_key = None
                for n in holders:
                    if mode != SHARED and (n_free[n] < c or n_room[n] < room_needed):
                        continue
                    gl = elig.get(n)
                    if gl is None or len(gl) < c:
                        continue
                    budget -= 1
                    q = self._qualifying(gl, need, mode, excluded)
                    if len(q) >= c:
                        s, gpus = self._pick(q, c, model)
                        loaded = sum(1 for g in gpus if model in g_models[g])
                        if loaded:
                            fits += 1
                            key = (loaded, -n_free[n] if self.binpack else n_free[n], s)
                            if best_key is None or key > best_key:
                                best, best_key = (n, gpus), key
                    if budget <= 0 or fits >= SCAN_LIMIT:
                        break
                if best is not None:
                    return best

        if mode == SHARED:
            # Shared requests pack onto servers that already host shared work (binpack) or go to
            # the emptiest servers first (spread); servers without shared work only offer their
            # empty GPUs, so the buckets from ``c`` up cover them.
            groups: list[Iterable[int]] = [self.shared_nodes]
            empties = [self.buckets[k] for k in range(c, self.max_k + 1)]
            groups = groups + empties if self.binpack else empties[::-1] + groups
            skip_shared = True
        else:
            groups = [self.buckets[k] for k in levels]
            skip_shared = False
        shared_nodes = self.shared_nodes
        n_room = self.n_room
        room_needed = need + self.margin
        # No model to weigh and no gpu_model filter: scores are the per-GPU load-balance scores.
        fast = mode != SHARED and not model and not shape[3][1]
        n_sorted = self.n_sorted
        g_live = self.g_live
        g_total = self.g_total
        g_base = self.g_base
        for group in groups:
            if not group:
                continue
            best = None
            best_score = -1.0
            seen = 0
            for n in group:
                gl = elig.get(n)
                if gl is None or len(gl) < c:
                    continue
                if skip_shared:
                    if group is not shared_nodes and n in shared_nodes:
                        continue
                elif n_room[n] < room_needed:
                    continue
                if fast:
                    # Empty GPUs already sorted by score: the first c that fit are the best c.
                    picked = []
                    for g in n_sorted[n]:
                        if (excluded is None or g not in excluded) and g_live[g] + room_needed <= g_total[g]:
                            picked.append(g)
                            if len(picked) == c:
                                break
                    if len(picked) < c:
                        continue
                    s = sum(map(g_base.__getitem__, picked))
                    gpus = tuple(sorted(picked))
                else:
                    q = self._qualifying(gl, need, mode, excluded)
                    if len(q) < c:
                        continue
                    s, gpus = self._pick(q, c, model)
                if s > best_score:
                    best, best_score = (n, gpus), s
                seen += 1
                if seen >= SCAN_LIMIT:
                    break
            if best is not None:
                return best
        self.nofit.add(key)
        return None

    # ------------------------------------------------------------------ state changes

    def _set_free(self, n: int, free: int) -> None:
        old = self.n_free[n]
        if old == free:
            return
        self.n_free[n] = free
        if self.n_ok[n] and self.n_gpus[n]:
            del self.buckets[old][n]
            self.buckets[free][n] = None

    def _place(self, task: PendingTask, n: int, gpus: tuple[int, ...], per_gpu: int, mode: str) -> None:
        score = self._take(task, n, gpus, per_gpu, mode)
        self._count_usage(task, len(gpus), per_gpu)
        g_id = self.g_id
        self.plan.placements.append(Placement(
            task_id=task.id, node_id=self.n_id[n], gpu_ids=tuple([g_id[g] for g in gpus]),
            memory_mb=per_gpu, exclusive=mode != SHARED, score=round(score, 3),
        ))

    def _take(self, task: PendingTask, n: int, gpus: tuple[int, ...], per_gpu: int, mode: str) -> float:
        """Mark ``gpus`` of server ``n`` taken in the working state; returns their score."""
        exclusive = mode != SHARED
        model = task.model_name
        score = sum(self._gpu_score(g, model) for g in gpus)
        g_claimed = self.g_claimed
        g_excl = self.g_excl
        g_shared = self.g_shared
        g_models = self.g_models
        g_base = self.g_base
        base_score = self._base_score
        became_busy = 0
        for g in gpus:
            if not g_excl[g] and not g_shared[g] and not g_claimed[g]:
                became_busy += 1
                for held in g_models[g]:
                    self._count_free_holder(held, n, -1)
            g_claimed[g] += per_gpu
            if exclusive:
                g_excl[g] = True
            else:
                if not g_shared[g]:
                    self.shared_nodes[n] = self.shared_nodes.get(n, 0) + 1
                g_shared[g] += 1
            g_base[g] = base_score(g)
            if model:
                models = g_models[g]
                if model not in models:
                    # The agent loads the model there; keep the working copy's LRU view honest.
                    models = dict.fromkeys(models)
                    models[model] = None
                    if len(models) > self.max_models > 0:
                        models.pop(next(iter(models)))
                    g_models[g] = models
                    self.model_nodes.setdefault(model, {})[n] = None
        if became_busy:
            self._set_free(n, self.n_free[n] - became_busy)
            # The GPUs just taken leave the server's empty list; the rest keep their order.
            remaining = [g for g in self.n_sorted[n] if g not in gpus]
            self.n_sorted[n] = remaining
            g_total = self.g_total
            g_live = self.g_live
            self.n_room[n] = max([g_total[g] - g_live[g] for g in remaining], default=-1)
        # The end is turned into a time only if a backfill reservation needs it.
        self.placed_ends.append((task.timeout_s, n, gpus, per_gpu, exclusive))
        return score

    def _count_usage(self, task: PendingTask, count: int, per_gpu: int) -> None:
        usage = self.t_usage.get(task.tenant_id)
        if usage is not None:
            usage[0] += count
            usage[1] += per_gpu * count
            usage[2] += 1
            self.placed_by_tenant.setdefault(task.tenant_id, []).append((task.timeout_s, count, per_gpu * count))
        cls = task.workload_class
        if cls in self.class_used:
            self.class_used[cls] += count

    def _release(self, victim: RunningTask) -> None:
        """Give a preempted task's GPUs back to the working state."""
        touched: dict[int, int] = {}
        for gid in victim.gpu_ids:
            g = self.gpu_index.get(gid)
            if g is None:
                continue
            was_empty = self._empty(g)
            self.g_claimed[g] = max(0, self.g_claimed[g] - victim.memory_mb)
            # Its process goes away too: the live reading will drop by about its claim.
            self.g_live[g] = max(0, self.g_live[g] - victim.memory_mb)
            if victim.exclusive:
                self.g_excl[g] = False
            else:
                self.g_shared[g] = max(0, self.g_shared[g] - 1)
                n = self.g_node[g]
                if not self.g_shared[g] and n in self.shared_nodes and g in self.n_gpus[n]:
                    self.shared_nodes[n] -= 1
                    if not self.shared_nodes[n]:
                        del self.shared_nodes[n]
            self.g_base[g] = self._base_score(g)
            n = self.g_node[g]
            if not was_empty and self._empty(g) and g in self.n_gpus[n]:
                touched[n] = touched.get(n, 0) + 1
                for held in self.g_models[g]:
                    self._count_free_holder(held, n, 1)
        for n, k in touched.items():
            self._set_free(n, self.n_free[n] + k)
        for n in {self.g_node[g] for g in (self.gpu_index.get(x) for x in victim.gpu_ids) if g is not None}:
            self.n_room[n] = self._room(n)
            self.n_sorted[n] = self._sorted_empty(n)
        usage = self.t_usage.get(victim.tenant_id)
        if usage is not None:
            usage[0] = max(0, usage[0] - len(victim.gpu_ids))
            usage[1] = max(0, usage[1] - victim.memory_mb * len(victim.gpu_ids))
            usage[2] = max(0, usage[2] - 1)
        if victim.workload_class in self.class_used:
            self.class_used[victim.workload_class] = max(0, self.class_used[victim.workload_class]
                                                         - len(victim.gpu_ids))
        del self.running[victim.id]
        # More capacity than before: earlier "nothing fits" answers may be wrong now.
        self.nofit.clear()
        self.novictims.clear()
        for by_node in self.victim_pools.values():
            for victims in by_node.values():
                if victim in victims:
                    victims.remove(victim)

    # ------------------------------------------------------------------ reclaim and preemption

    def _reclaim_or_preempt(self, task: PendingTask, c: int, mem: int | None, mode: str, shape: tuple,
                            elig: dict[int, tuple[int, ...]],
                            excluded: frozenset[int] | None) -> tuple[int, tuple[int, ...]] | None:
        cls = task.workload_class
        if self.cfg.allow_borrowing and cls in self.class_cap:
            other = self._other(cls)
            borrowed = self.class_used[other] - self.class_cap[other]
            if borrowed > 0 and self.class_used[cls] + c <= self.class_cap[cls]:
                found = self._with_victims(
                    task, c, mem, mode, elig, excluded, pool=f"class:{other}", max_priority=task.priority,
                    budget=borrowed, reason=f"borrowed {other} GPUs reclaimed for {cls} task #{task.id}",
                )
                if found is not None:
                    return found
        if task.priority in self.preempt_allowed and task.priority > LOW:
            return self._with_victims(
                task, c, mem, mode, elig, excluded, pool="low-batch", max_priority=LOW, budget=None,
                reason=f"preempted by {PRIORITY_NAMES[task.priority]} task #{task.id}",
            )
        return None

    def _victim_pool(self, pool: str) -> dict[int, list[RunningTask]]:
        """Running tasks that may be victims, by server (built once; preempted ones are removed)."""
        by_node = self.victim_pools.get(pool)
        if by_node is None:
            by_node = self.victim_pools[pool] = {}
            for r in self.running.values():
                if pool == "low-batch":
                    if r.priority != LOW or r.workload_class != "batch":
                        continue
                elif r.workload_class != pool.removeprefix("class:"):
                    continue
                g0 = self.gpu_index.get(r.gpu_ids[0]) if r.gpu_ids else None
                if g0 is not None:
                    by_node.setdefault(self.g_node[g0], []).append(r)
        return by_node

    def _with_victims(self, task: PendingTask, c: int, mem: int | None, mode: str,
                      elig: dict[int, tuple[int, ...]], excluded: frozenset[int] | None, *, pool: str,
                      max_priority: int, budget: int | None, reason: str) -> tuple[int, tuple[int, ...]] | None:
        memo = (pool, max_priority, c, mem, mode, id(elig), id(excluded) if excluded is not None else 0)
        if memo in self.novictims:
            return None
        need = mem if mem is not None else 0
        best_key: tuple[int, int, int] | None = None
        best_victims: list[RunningTask] = []
        for n, candidates in self._victim_pool(pool).items():
            gl = elig.get(n)
            if gl is None:
                continue
            victims = [r for r in candidates if r.priority <= max_priority]
            if not victims:
                continue
            # Cheap bound first: usable GPUs plus every GPU the victims hold must reach the gang size.
            held = {gid for r in victims for gid in r.gpu_ids}
            usable = self._qualifying(gl, need, mode, excluded)
            if len(usable) + sum(1 for g in gl if self.g_id[g] in held) < c:
                continue
            # Newest first; and biggest first, which can need fewer victims. The better one wins.
            for order in (sorted(victims, key=lambda r: -r.id),
                          sorted(victims, key=lambda r: (-len(r.gpu_ids), -r.id))):
                chosen = self._victims_on(gl, order, c, need, mode, excluded, budget)
                if chosen is None:
                    continue
                key = (len(chosen), sum(len(v.gpu_ids) for v in chosen), n)
                if best_key is None or key < best_key:
                    best_key, best_victims = key, chosen
            if best_key is not None and best_key[0] == 1 and best_key[1] <= c:
                break  # one victim freeing no more than the task needs: nothing can do better
        if best_key is None:
            # Victims only get fewer and GPUs only get taken until the next preemption.
            self.novictims.add(memo)
            return None
        n = best_key[2]
        for v in best_victims:
            self._release(v)
            self.plan.preemptions.append(Preemption(task_id=v.id, by_task_id=task.id, reason=reason))
        return self._search(task, c, mem, mode, (), elig, excluded, n)

    def _victims_on(self, gl: tuple[int, ...], order: list[RunningTask], c: int, need: int, mode: str,
                    excluded: frozenset[int] | None, budget: int | None) -> list[RunningTask] | None:
        """Victims taken in ``order`` until the task fits on this server, minus those not needed."""
        state = self._node_state(gl)
        chosen: list[RunningTask] = []
        freed = 0
        for v in order:
            if budget is not None and freed >= budget:
                return None
            chosen.append(v)
            freed += len(v.gpu_ids)
            self._sim_release(state, v)
            if self._sim_count(state, gl, need, mode, excluded) >= c:
                break
        else:
            return None
        # Spare victims that turn out unnecessary (a later one may have been enough alone).
        for v in list(chosen):
            trial = [x for x in chosen if x is not v]
            st = self._node_state(gl)
            for x in trial:
                self._sim_release(st, x)
            if self._sim_count(st, gl, need, mode, excluded) >= c:
                chosen = trial
        return chosen

    def _node_state(self, gl: tuple[int, ...]) -> dict[int, list]:
        return {g: [self.g_claimed[g], self.g_live[g], self.g_excl[g], self.g_shared[g]] for g in gl}

    def _sim_release(self, state: dict[int, list], r) -> None:
        """Apply the end of a task to a simulated node: a RunningTask, or a
        ``(gpus, memory, exclusive, in_live)`` tuple; ``in_live`` says whether the agent's live
        reading includes its memory (not yet for a task placed in this pass)."""
        if isinstance(r, RunningTask):
            gids = [self.gpu_index.get(x) for x in r.gpu_ids]
            mem, exclusive, in_live = r.memory_mb, r.exclusive, True
        else:
            gids, mem, exclusive, in_live = r
        for g in gids:
            s = state.get(g)
            if s is None:
                continue
            s[0] = max(0, s[0] - mem)
            if in_live:
                s[1] = max(0, s[1] - mem)
            if exclusive:
                s[2] = False
            else:
                s[3] = max(0, s[3] - 1)

    def _sim_qualifying(self, state: dict[int, list], gl: tuple[int, ...], mem: int, mode: str,
                        excluded: frozenset[int] | None) -> list[int]:
        out = []
        margin = self.margin
        for g in gl:
            if excluded is not None and g in excluded:
                continue
            claimed, live, excl, shared = state[g]
            if excl:
                continue
            if mode == SHARED:
                if max(claimed, live) + mem + margin <= self.g_total[g]:
                    out.append(g)
            elif not shared and not claimed and live + mem + margin <= self.g_total[g]:
                out.append(g)
        return out

    def _sim_count(self, state, gl, mem, mode, excluded) -> int:
        return len(self._sim_qualifying(state, gl, mem, mode, excluded))

    # ------------------------------------------------------------------ backfill reservation

    def _reserve(self, task: PendingTask, shape: tuple, booked: frozenset[int] | None = None) -> _Reservation | None:
        """Earliest time and GPUs at which ``task`` fits, replaying the ends of running tasks."""
        c, mem, mode, ckey = shape
        elig = self.elig_cache[ckey]
        events: dict[int, list[tuple]] = {}
        for n, when, change in self._end_events(elig):
            events.setdefault(n, []).append((when, change))
        best: _Reservation | None = None
        for n, evs in events.items():
            evs.sort(key=lambda e: e[0])
            gl = elig[n]
            if len(gl) < c:
                continue
            state = self._node_state(gl)
            for when, change in evs:
                if best is not None and when >= best.time:
                    break
                self._sim_release(state, change)
                q = self._sim_qualifying(state, gl, mem, mode, booked)
                if len(q) >= c:
                    best = _Reservation(task.id, when, (n,), frozenset(q[:c]))
                    break
        return best

    def _end_events(self, elig: dict[int, tuple[int, ...]]) -> Iterable[tuple[int, datetime, tuple]]:
        """``(server, when, change)`` for every end the reservation replays: running tasks at their
        expected end, tasks placed in this pass at ``now + timeout_s``. A running gang ends on
        each of its servers."""
        g_node = self.g_node
        gpu_index = self.gpu_index
        for r in self.running.values():
            by_node: dict[int, list[int]] = {}
            for x in r.gpu_ids:
                g = gpu_index.get(x)
                if g is not None:
                    by_node.setdefault(g_node[g], []).append(g)
            for n, gids in by_node.items():
                if n in elig:
                    yield n, r.expected_end, (gids, r.memory_mb, r.exclusive, True)
        for timeout_s, n, gpus, per_gpu, exclusive in self.placed_ends:
            if n in elig:
                yield n, self.now + timedelta(seconds=timeout_s), (list(gpus), per_gpu, exclusive, False)

    # ------------------------------------------------------------------ gangs across servers
    # A gang's shape: (GANG, servers, GPUs per server, memory, mode, constraints, topology label).
    # Gangs are exclusive (a shared request is placed as exclusive) and get every server at once
    # or nothing; each server gets the same number of GPUs.

    def _decide_gang(self, task: PendingTask, head: PendingTask | None, waiting_higher: int,
                     waiting_total: int) -> tuple[str, object] | None:
        nn, c, mem = task.nodes, task.gpu_count, task.memory_mb
        if c < nn or c % nn or (mem is not None and mem < 0):
            return ("reason", f"asks for {c} GPUs over {nn} servers: not the same whole number on each")
        k = c // nn
        mode = WHOLE if mem is None else EXCLUSIVE
        sel = task.node_selector
        ckey = (tuple(sorted((str(key), str(v)) for key, v in sel.items())) if sel else (), task.gpu_model or "")
        elig = self.elig_cache.get(ckey)
        if elig is None:
            elig = self.elig_cache[ckey] = self._eligible(ckey)
        shape = (GANG, nn, k, mem if mem is not None else 0, mode, ckey, task.topology_key)
        r = self.static_cache.get(shape)
        if r is None:
            r = self.static_cache[shape] = self._gang_static_reason(shape, elig)
        if r:
            return ("reason", r)
        r = self._quota_reason(task, c, mem)
        if r is None and mode == WHOLE:
            smallest = self.smallest_cache.get(ckey)
            if smallest is None:
                smallest = self.smallest_cache[ckey] = min(self.g_total[g] for gl in elig.values() for g in gl)
            r = self._memory_quota_reason(task, c * smallest)
        if r is None:
            r = self._share_reason(task, c)
        if r is not None:
            return ("reason", r)
        if head is not None and not self.cfg.backfill:
            if waiting_higher == waiting_total:
                return ("wait", f"waiting behind {_plural(waiting_total, 'higher-priority task')}")
            return ("wait", f"waiting behind {_plural(waiting_total, 'earlier task')} in the queue "
                            f"({waiting_higher} of higher priority)")
        # Booked reservations first (GPUs this gang may not use), then the backfill reservation.
        booked = self._booked_for(task) if self.windows or task.reservation_id is not None else None
        if isinstance(booked, str):
            return ("reason", booked)
        excluded: frozenset[int] | None = booked
        res = self.reservation
        if res is not None and self._ends_after(task, res):
            excluded = res.gpus if booked is None else self._union(booked, res.gpus)
        found = self._search_gang(task, shape, elig, excluded)
        if found is None:
            found = self._gang_reclaim_or_preempt(task, shape, elig, excluded)
        if found is None:
            if excluded is not booked and self._search_gang(task, shape, elig, booked) is not None:
                return ("reason", f"reserved for backfill: would delay task #{res.task_id}")
            if booked is not None and self._search_gang(task, shape, elig, None) is not None:
                return ("reason", self._booked_reason(task))
            return ("capacity", shape)
        per_gpu = mem if mem is not None else min(self.g_total[g] for _n, gpus in found for g in gpus)
        if mem is None:
            r = self._memory_quota_reason(task, c * per_gpu)
            if r is not None:
                return ("reason", r)
        score = 0.0
        for n, gpus in found:
            score += self._take(task, n, gpus, per_gpu, mode)
        self._count_usage(task, c, per_gpu)
        g_id, n_id = self.g_id, self.n_id
        ranks = tuple((n_id[n], tuple(g_id[g] for g in gpus)) for n, gpus in found)
        self.plan.placements.append(Placement(
            task_id=task.id, node_id=ranks[0][0], gpu_ids=tuple(g for _n, gids in ranks for g in gids),
            memory_mb=per_gpu, exclusive=True, score=round(score, 3), ranks=ranks,
        ))
        return None

    def _gang_group(self, n: int, topo: str) -> str | None:
        """The topology group of server ``n`` (None: it lacks the label, so it cannot take part)."""
        if not topo:
            return ""
        value = self.n_labels[n].get(topo)
        return None if value is None else str(value)

    def _gang_text(self, shape: tuple, free: str) -> str:
        _g, nn, k, mem, mode, ckey, topo = shape
        what = _plural(k, f"{free} GPU".lstrip()) + (f" with {format_mb(mem)}" if mode != WHOLE else "")
        sharing = f" sharing {topo}" if topo else ""
        return f"{nn} servers with {what}{self._constraint_text(ckey)}{sharing}"

    def _gang_static_reason(self, shape: tuple, elig: dict[int, tuple[int, ...]]) -> str:
        """Why no set of active servers could ever hold this gang ("" when one could)."""
        _g, nn, k, mem, mode, ckey, topo = shape
        r = self._static_reason((k, mem, mode, ckey), elig)
        if r:
            return r
        need = self.margin + (mem if mode != WHOLE else 0)
        total = self.g_total
        groups: dict[str, int] = {}
        for n, gl in elig.items():
            group = self._gang_group(n, topo)
            if group is not None and sum(1 for g in gl if total[g] >= need) >= k:
                groups[group] = groups.get(group, 0) + 1
        best = max(groups.values(), default=0)
        if best < nn:
            return f"no {self._gang_text(shape, '')} even when idle; the most there are is {best}"
        return ""

    def _gang_fits(self, shape: tuple, elig: dict[int, tuple[int, ...]], excluded: frozenset[int] | None,
                   model: str, stop: bool) -> dict[str, list[tuple[int, tuple[int, ...]]]]:
        """Servers able to hold one rank now, by topology group, in packing order (the fullest
        that fits first with binpack). With ``stop``, returns as soon as a group is complete."""
        _g, nn, k, mem, mode, _ckey, topo = shape
        n_room = self.n_room
        room_needed = mem + self.margin
        groups: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
        levels = range(k, self.max_k + 1) if self.binpack else range(self.max_k, k - 1, -1)
        for level in levels:
            for n in self.buckets[level]:
                gl = elig.get(n)
                if gl is None or len(gl) < k or n_room[n] < room_needed:
                    continue
                group = self._gang_group(n, topo)
                if group is None:
                    continue
                q = self._qualifying(gl, mem, mode, excluded)
                if len(q) < k:
                    continue
                members = groups.setdefault(group, [])
                members.append((n, self._pick(q, k, model)[1]))
                if stop and len(members) == nn:
                    return {group: members}
        return groups

    def _search_gang(self, task: PendingTask, shape: tuple, elig: dict[int, tuple[int, ...]],
                     excluded: frozenset[int] | None) -> list[tuple[int, tuple[int, ...]]] | None:
        """``nodes`` servers (rank order) with their GPUs, all in one topology group, or None."""
        key = (shape, id(excluded) if excluded is not None else 0)
        if key in self.nofit:
            return None
        nn = shape[1]
        for members in self._gang_fits(shape, elig, excluded, task.model_name, stop=True).values():
            if len(members) >= nn:
                return members[:nn]
        self.nofit.add(key)
        return None

    def _gang_capacity_reason(self, shape: tuple) -> str:
        nn = shape[1]
        groups = self._gang_fits(shape, self.elig_cache[shape[5]], None, "", stop=False)
        best = max((len(m) for m in groups.values()), default=0)
        free = "empty" if shape[4] == WHOLE else "free"
        if best >= nn:
            return (f"no {self._gang_text(shape, free)} at its turn; capacity freed later went to "
                    f"other tasks")
        return f"no {self._gang_text(shape, free)}; best has {best}"

    def _gang_reclaim_or_preempt(self, task: PendingTask, shape: tuple, elig: dict[int, tuple[int, ...]],
                                 excluded: frozenset[int] | None) -> list[tuple[int, tuple[int, ...]]] | None:
        cls = task.workload_class
        c = task.gpu_count
        if self.cfg.allow_borrowing and cls in self.class_cap:
            other = self._other(cls)
            borrowed = self.class_used[other] - self.class_cap[other]
            if borrowed > 0 and self.class_used[cls] + c <= self.class_cap[cls]:
                found = self._gang_with_victims(
                    task, shape, elig, excluded, pool=f"class:{other}", max_priority=task.priority,
                    budget=borrowed, reason=f"borrowed {other} GPUs reclaimed for {cls} task #{task.id}",
                )
                if found is not None:
                    return found
        if task.priority in self.preempt_allowed and task.priority > LOW:
            return self._gang_with_victims(
                task, shape, elig, excluded, pool="low-batch", max_priority=LOW, budget=None,
                reason=f"preempted by {PRIORITY_NAMES[task.priority]} task #{task.id}",
            )
        return None

    def _gang_with_victims(self, task: PendingTask, shape: tuple, elig: dict[int, tuple[int, ...]],
                           excluded: frozenset[int] | None, *, pool: str, max_priority: int, budget: int | None,
                           reason: str) -> list[tuple[int, tuple[int, ...]]] | None:
        """The cheapest ``nodes`` servers of one topology group to free (fewest victims, then fewest
        GPUs freed); servers that already fit cost nothing. Victims are released, then placed."""
        _g, nn, k, mem, mode, _ckey, topo = shape
        memo = (pool, max_priority, shape, id(excluded) if excluded is not None else 0)
        if memo in self.novictims:
            return None
        by_node = self._victim_pool(pool)
        options: dict[str, list[tuple[int, int, int, list[RunningTask]]]] = {}
        for n, gl in elig.items():
            if len(gl) < k:
                continue
            group = self._gang_group(n, topo)
            if group is None:
                continue
            if len(self._qualifying(gl, mem, mode, excluded)) >= k:
                options.setdefault(group, []).append((0, 0, n, []))
                continue
            victims = [r for r in by_node.get(n, ()) if r.priority <= max_priority]
            if not victims:
                continue
            best: list[RunningTask] | None = None
            for order in (sorted(victims, key=lambda r: -r.id),
                          sorted(victims, key=lambda r: (-len(r.gpu_ids), -r.id))):
                chosen = self._victims_on(gl, order, k, mem, mode, excluded, None)
                if chosen is not None and (best is None or len(chosen) < len(best)):
                    best = chosen
            if best is not None:
                options.setdefault(group, []).append((len(best), sum(len(v.gpu_ids) for v in best), n, best))
        choice: tuple[tuple[int, int], list[tuple[int, int, int, list[RunningTask]]]] | None = None
        for members in options.values():
            if len(members) < nn:
                continue
            members.sort(key=lambda o: (o[0], o[1], o[2]))
            picked = members[:nn]
            cost = (sum(o[0] for o in picked), sum(o[1] for o in picked))
            if budget is not None and cost[1] > budget:
                continue
            if choice is None or cost < choice[0]:
                choice = (cost, picked)
        if choice is None or not choice[0][0]:
            self.novictims.add(memo)
            return None
        released: set[int] = set()
        for _v, _gpus, _n, victims in choice[1]:
            for v in victims:
                if v.id in released:
                    continue  # a gang victim counted on two of the chosen servers
                released.add(v.id)
                self._release(v)
                self.plan.preemptions.append(Preemption(task_id=v.id, by_task_id=task.id, reason=reason))
        found = []
        for _v, _gpus, n, _victims in choice[1]:
            q = self._qualifying(elig[n], mem, mode, excluded)
            if len(q) < k:  # pragma: no cover - the victims were simulated on exactly these GPUs
                return None
            found.append((n, self._pick(q, k, task.model_name)[1]))
        return found

    def _reserve_gang(self, task: PendingTask, shape: tuple) -> _Reservation | None:
        """Earliest time at which ``nodes`` servers of one group can each hold a rank, replaying
        the ends of running tasks across all eligible servers in time order."""
        _g, nn, k, mem, mode, ckey, topo = shape
        elig = self.elig_cache[ckey]
        ready: dict[str, dict[int, frozenset[int]]] = {}
        group_of: dict[int, str] = {}
        for n, gl in elig.items():
            group = self._gang_group(n, topo)
            if group is None or len(gl) < k:
                continue
            group_of[n] = group
            q = self._qualifying(gl, mem, mode, None)
            if len(q) >= k:
                ready.setdefault(group, {})[n] = frozenset(q[:k])
        events = sorted((e for e in self._end_events(elig) if e[0] in group_of), key=lambda e: e[1])
        states: dict[int, dict[int, list]] = {}
        for n, when, change in events:
            state = states.get(n)
            if state is None:
                state = states[n] = self._node_state(elig[n])
            self._sim_release(state, change)
            q = self._sim_qualifying(state, elig[n], mem, mode, None)
            if len(q) < k:
                continue
            members = ready.setdefault(group_of[n], {})
            members[n] = frozenset(q[:k])
            if len(members) >= nn:
                chosen = list(members)[:nn]
                gpus = frozenset().union(*(members[m] for m in chosen))
                return _Reservation(task.id, when, tuple(chosen), gpus)
        return None
