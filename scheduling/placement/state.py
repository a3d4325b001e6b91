"""The pass's working state: GPUs, servers, buckets and usage, kept consistent in one place.

A pass copies the snapshot into parallel lists indexed by a dense internal GPU index
(``g_*``) and server index (``n_*``): attribute access on lists of ints is what keeps the
inner loops fast. Beside them sit indexes the scans rely on:

- ``buckets[k]``: active servers with exactly ``k`` empty schedulable GPUs, so an
  exclusive request of ``n`` GPUs only visits servers with at least ``n`` empty GPUs;
- ``n_room``: per server, the most memory an exclusive request can get on one empty GPU;
- ``n_sorted``: per server, its empty schedulable GPUs, best score first;
- ``shared_nodes``: active servers with GPUs hosting shared work (and how many);
- ``model_nodes`` / ``model_free``: model -> servers holding it (on any GPU / on empty GPUs);
- ``g_base``: each GPU's load-balance score (``scoring.base_score``);
- tenant usage (``t_usage``), class usage (``class_used``), the running tasks, and the ends of
  the tasks placed in this pass (for backfill and quota holds).

Only ``take`` (a placement), ``count_usage`` and ``release`` (a preemption) change the state,
and each updates every index it touches; nothing else writes to it. ``sim_node`` is a
throw-away copy of one server's GPU columns on which backfill and preemption replay ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from scheduling.placement.fit import SHARED, Gpus, empty_gpus, is_empty
from scheduling.placement.scoring import base_score, gpu_score, pick, static_score
from scheduling.placement.types import GpuState, PendingTask, RunningTask, Snapshot


class WorkingState:
    """The snapshot as the pass sees it, updated by every placement and preemption."""

    def __init__(self, snapshot: Snapshot) -> None:
        cfg = snapshot.config
        self.margin = cfg.memory_safety_margin_mb
        self.max_models = cfg.max_models_per_gpu
        self.binpack = cfg.strategy != "spread"
        self.now = snapshot.now

        # The GPU columns, each built in one comprehension over all GPUs (a pass's fixed cost
        # grows with the cluster, and a lone task's pass is mostly this).
        now = snapshot.now
        nodes = snapshot.nodes
        all_gpus: list[GpuState] = [gpu for node in nodes for gpu in node.gpus]
        self.g_id: list[int] = [gpu.id for gpu in all_gpus]
        self.g_node: list[int] = [n for n, node in enumerate(nodes) for _ in node.gpus]
        self.g_total: list[int] = [gpu.memory_total_mb for gpu in all_gpus]
        self.g_claimed: list[int] = [gpu.memory_claimed_mb for gpu in all_gpus]
        self.g_live: list[int] = [gpu.memory_used_live_mb for gpu in all_gpus]
        self.g_excl: list[bool] = [bool(gpu.exclusive_taken) for gpu in all_gpus]
        self.g_shared: list[int] = [gpu.shared_count for gpu in all_gpus]
        # Kept as the snapshot's dict until a placement adds a model (copy on write).
        self.g_models: list[Iterable[str]] = [gpu.loaded_models or () for gpu in all_gpus]
        self.g_model_lower: list[str] = [(gpu.model_name or "").lower() for gpu in all_gpus]
        # utilisation + temperature + idle part of the score
        self.g_static: list[float] = [static_score(gpu, now) for gpu in all_gpus]
        self.gpu_index: dict[int, int] = {gpu_id: g for g, gpu_id in enumerate(self.g_id)}

        self.n_id: list[int] = [node.id for node in nodes]
        self.n_name: list[str] = [node.name for node in nodes]
        self.n_labels: list[dict[str, str]] = [node.labels or {} for node in nodes]
        self.n_ok: list[bool] = [bool(node.schedulable) for node in nodes]
        self.n_gpus: list[tuple[int, ...]] = []  # schedulable GPUs of an active server
        self.n_free: list[int] = []  # empty schedulable GPUs

        max_gpus = 0
        schedulable_total = 0
        g = 0
        for node in nodes:
            ok_gpus = (tuple(g + i for i, gpu in enumerate(node.gpus) if gpu.schedulable) if node.schedulable
                       else ())
            g += len(node.gpus)
            self.n_gpus.append(ok_gpus)
            self.n_free.append(len(self._empty_of(ok_gpus)))
            schedulable_total += len(ok_gpus)
            max_gpus = max(max_gpus, len(ok_gpus))

        # The fit rule over the live columns (the lists are only ever changed in place).
        self.gpus = Gpus(self.margin, self.g_total, self.g_claimed, self.g_live, self.g_excl, self.g_shared)
        self._qualifying = self.gpus.qualifying
        self._first_empty_fitting = self.gpus.first_empty_fitting

        self.schedulable_total = schedulable_total
        # Active servers with at least one GPU hosting shared allocations: n -> count of such GPUs.
        self.shared_nodes: dict[int, int] = {}
        for n, gl in enumerate(self.n_gpus):
            k = sum(1 for g in gl if self.g_shared[g] and not self.g_excl[g])
            if k and self.n_ok[n]:
                self.shared_nodes[n] = k
        self.g_base: list[float] = [self._base_score(g) for g in range(len(self.g_id))]
        # The best GPUs of a server for a task (the score columns are only ever changed in place).
        self._pick = partial(pick, self.g_base, self.g_models, self.max_models)
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
            empties = set(self._empty_of(gl))
            for g in gl:
                empty = g in empties
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
        # Per tenant, tasks placed in this pass: (timeout_s, gpus, memory): their ends, for quota holds.
        self.placed_by_tenant: dict[int, list[tuple[int, int, int]]] = {}

    # ------------------------------------------------------------------ building and reading

    def _base_score(self, g: int) -> float:
        return base_score(self.g_total[g], self.g_claimed[g], self.g_live[g], self.g_static[g], self.binpack)

    def _count_free_holder(self, model: str, n: int, delta: int) -> None:
        counts = self.model_free.setdefault(model, {})
        k = counts.get(n, 0) + delta
        if k > 0:
            counts[n] = k
        else:
            counts.pop(n, None)

    def _sorted_empty(self, n: int) -> list[int]:
        base = self.g_base
        return sorted(self._empty_of(self.n_gpus[n]), key=lambda g: (-base[g], g))

    def _room(self, n: int) -> int:
        total, live = self.g_total, self.g_live
        return max([total[g] - live[g] for g in self._empty_of(self.n_gpus[n])], default=-1)

    def _empty(self, g: int) -> bool:
        return is_empty(self.g_excl[g], self.g_shared[g], self.g_claimed[g])

    def _empty_of(self, gl: Iterable[int]) -> list[int]:
        return empty_gpus(gl, self.g_excl, self.g_shared, self.g_claimed)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ changes

    def _set_free(self, n: int, free: int) -> None:
        old = self.n_free[n]
        if old == free:
            return
        self.n_free[n] = free
        if self.n_ok[n] and self.n_gpus[n]:
            del self.buckets[old][n]
            self.buckets[free][n] = None

    def take(self, task: PendingTask, n: int, gpus: tuple[int, ...], per_gpu: int, mode: str) -> float:
        """Mark ``gpus`` of server ``n`` taken by ``task``; returns their score."""
        exclusive = mode != SHARED
        model = task.model_name
        g_claimed = self.g_claimed
        g_excl = self.g_excl
        g_shared = self.g_shared
        g_models = self.g_models
        g_base = self.g_base
        g_total = self.g_total
        g_live = self.g_live
        g_static = self.g_static
        binpack = self.binpack
        max_models = self.max_models
        score = sum(gpu_score(g_base[g], g_models[g], model, max_models) for g in gpus)
        became_busy = 0
        for g in gpus:
            if is_empty(g_excl[g], g_shared[g], g_claimed[g]):
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
            g_base[g] = base_score(g_total[g], g_claimed[g], g_live[g], g_static[g], binpack)
            if model:
                models = g_models[g]
                if model not in models:
                    # The agent loads the model there; keep the working copy's LRU view honest.
                    models = dict.fromkeys(models)
                    models[model] = None
                    if len(models) > max_models > 0:
                        models.pop(next(iter(models)))
                    g_models[g] = models
                    self.model_nodes.setdefault(model, {})[n] = None
        if became_busy:
            self._set_free(n, self.n_free[n] - became_busy)
            # The GPUs just taken leave the server's empty list; the rest keep their order.
            remaining = [g for g in self.n_sorted[n] if g not in gpus]
            self.n_sorted[n] = remaining
            self.n_room[n] = max([g_total[g] - g_live[g] for g in remaining], default=-1)
        # The end is turned into a time only if a backfill reservation needs it.
        self.placed_ends.append((task.timeout_s, n, gpus, per_gpu, exclusive))
        return score

    def count_usage(self, task: PendingTask, count: int, per_gpu: int) -> None:
        """Add a placed task to its tenant's and its class's usage."""
        usage = self.t_usage.get(task.tenant_id)
        if usage is not None:
            usage[0] += count
            usage[1] += per_gpu * count
            usage[2] += 1
            self.placed_by_tenant.setdefault(task.tenant_id, []).append((task.timeout_s, count, per_gpu * count))
        cls = task.workload_class
        if cls in self.class_used:
            self.class_used[cls] += count

    def release(self, victim: RunningTask) -> None:
        """Give a preempted task's GPUs, tenant usage and class usage back."""
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

    # ------------------------------------------------------------------ simulated servers

    def sim_node(self, gl: tuple[int, ...]) -> Gpus:
        """A copy of server GPUs ``gl`` to replay ends on (``.qualifying`` applies the fit rule to it)."""
        claimed, live, excl, shared = self.g_claimed, self.g_live, self.g_excl, self.g_shared
        c2: dict[int, int] = {}
        l2: dict[int, int] = {}
        e2: dict[int, bool] = {}
        s2: dict[int, int] = {}
        for g in gl:  # one loop rather than four comprehensions: this runs per server replayed
            c2[g] = claimed[g]
            l2[g] = live[g]
            e2[g] = excl[g]
            s2[g] = shared[g]
        return Gpus(self.margin, self.g_total, c2, l2, e2, s2)

    def sim_release(self, state: Gpus, r: RunningTask | tuple) -> None:
        """Apply the end of a task to a simulated server: a RunningTask, or a
        ``(gpus, memory, exclusive, in_live)`` tuple; ``in_live`` says whether the agent's live
        reading includes its memory (not yet for a task placed in this pass)."""
        if isinstance(r, RunningTask):
            gids = [self.gpu_index.get(x) for x in r.gpu_ids]
            mem, exclusive, in_live = r.memory_mb, r.exclusive, True
        else:
            gids, mem, exclusive, in_live = r
        claimed, live, excl, shared = state.claimed, state.live, state.excl, state.shared
        for g in gids:
            if g not in claimed:
                continue
            claimed[g] = max(0, claimed[g] - mem)
            if in_live:
                live[g] = max(0, live[g] - mem)
            if exclusive:
                excl[g] = False
            else:
                shared[g] = max(0, shared[g] - 1)
