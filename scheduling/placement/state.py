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
from datetime import datetime
from functools import partial
from operator import is_

from scheduling.placement.fit import SHARED, Gpus, empty_gpus, is_empty
from scheduling.placement.scoring import base_score, gpu_score, pick, static_score_steady
from scheduling.placement.types import NodeState, PendingTask, RunningTask, Snapshot


class _NodeColumns:
    """One server's part of the working state's columns, with GPU positions local to the server
    (``ok``, ``sorted``): what ``WorkingState`` builds from a server's GPUs before any decision.

    A function of the server's GpuStates, its ``schedulable`` flag, the strategy, and ``now``
    through the idle part of each GPU's static score, which moves in whole steps and stops
    once the GPU has been idle long enough (or is busy). ``valid_from`` and ``valid_until``:
    the clock times between which every GPU's score stays what it is now (``scoring.static_score_steady``;
    None for an open end), so the columns serve any pass in between."""

    __slots__ = ("base", "binpack", "claimed", "excl", "free", "gpus", "ids", "live", "model_free", "model_lower",
                 "model_nodes", "models", "ok", "room", "schedulable", "shared", "shared_k", "sig", "sorted",
                 "static", "total", "valid_from", "valid_until")

    def __init__(self, node: NodeState, now: datetime, binpack: bool) -> None:
        gpus = self.gpus = tuple(node.gpus)
        self.schedulable = bool(node.schedulable)
        self.binpack = binpack
        self.ids = [gpu.id for gpu in gpus]
        total = self.total = [gpu.memory_total_mb for gpu in gpus]
        claimed = self.claimed = [gpu.memory_claimed_mb for gpu in gpus]
        live = self.live = [gpu.memory_used_live_mb for gpu in gpus]
        excl = self.excl = [bool(gpu.exclusive_taken) for gpu in gpus]
        shared = self.shared = [gpu.shared_count for gpu in gpus]
        models = self.models = [gpu.loaded_models or () for gpu in gpus]
        self.model_lower = [(gpu.model_name or "").lower() for gpu in gpus]
        steady = [static_score_steady(gpu, now) for gpu in gpus]
        static = self.static = [score for score, _lo, _hi in steady]
        base = self.base = [base_score(total[i], claimed[i], live[i], static[i], binpack) for i in range(len(gpus))]
        ok = self.ok = (tuple(i for i, gpu in enumerate(gpus) if gpu.schedulable) if self.schedulable else ())
        empties = empty_gpus(ok, excl, shared, claimed)
        self.free = len(empties)
        self.room = max([total[i] - live[i] for i in empties], default=-1)
        self.sorted = sorted(empties, key=lambda i: (-base[i], i))
        # The memory each schedulable GPU offers when idle, largest first (search._static_reason).
        baseline = min([live[i] for i in empties], default=0)
        self.sig = tuple(sorted((total[i] - baseline for i in ok), reverse=True))
        self.shared_k = sum(1 for i in ok if shared[i] and not excl[i])
        model_nodes: dict[str, None] = {}
        model_free: dict[str, int] = {}
        empty_set = set(empties)
        for i in ok:
            for model in models[i]:
                model_nodes[model] = None
                if i in empty_set:
                    model_free[model] = model_free.get(model, 0) + 1
        self.model_nodes = model_nodes
        self.model_free = model_free
        valid_from: datetime | None = None
        valid_until: datetime | None = None
        for _score, lo, hi in steady:
            if lo is not None and (valid_from is None or lo > valid_from):
                valid_from = lo
            if hi is not None and (valid_until is None or hi < valid_until):
                valid_until = hi
        self.valid_from = valid_from
        self.valid_until = valid_until

    def fits(self, node: NodeState, now: datetime, binpack: bool) -> bool:
        """Whether these columns are what ``_NodeColumns(node, now, binpack)`` would build."""
        if (self.valid_from is not None and now < self.valid_from) or (
                self.valid_until is not None and now >= self.valid_until):
            return False
        if binpack != self.binpack or bool(node.schedulable) != self.schedulable:
            return False
        gpus = node.gpus
        mine = self.gpus
        if len(gpus) != len(mine):
            return False
        return all(map(is_, gpus, mine))


# The per-GPU columns of ``_NodeColumns`` that the working state lays end to end.
_FLAT = ("ids", "total", "claimed", "live", "excl", "shared", "models", "model_lower", "static", "base")


class _Flat:
    """The whole cluster's GPU columns (``_FLAT``, in order), laid end to end from its servers'
    columns ``entries``, and each server's schedulable and sorted empty GPUs at their places in
    them; never changed once built (the working state copies the lists it changes)."""

    __slots__ = ("columns", "entries", "g_node", "gpu_index", "n_gpus", "n_sorted", "offsets")

    def __init__(self, entries: list[_NodeColumns], prev: _Flat | None) -> None:
        self.entries = entries
        if prev is not None and self._patch(prev):
            return
        self.columns = tuple([x for e in entries for x in getattr(e, name)] for name in _FLAT)
        self.offsets = []
        g = 0
        for e in entries:
            self.offsets.append(g)
            g += len(e.ids)
        self.g_node = [n for n, e in enumerate(entries) for _ in e.ids]
        self.gpu_index = {gpu_id: g for g, gpu_id in enumerate(self.columns[0])}
        self.n_gpus = [tuple(g + i for i in e.ok) if g else e.ok for g, e in zip(self.offsets, entries)]  # noqa: B905
        self.n_sorted = [[g + i for i in e.sorted] for g, e in zip(self.offsets, entries)]  # noqa: B905

    def _patch(self, prev: _Flat) -> bool:
        """The previous columns with only the servers whose columns changed written over,
        when every such server has as many GPUs as the one it replaces (same layout)."""
        entries, before = self.entries, prev.entries
        if len(entries) != len(before):
            return False
        changed = [n for n, (a, b) in enumerate(zip(entries, before)) if a is not b]  # noqa: B905 - same length
        if any(len(entries[n].ids) != len(before[n].ids) for n in changed):
            return False
        if len(changed) * 2 > len(entries):
            return False  # mostly new: building afresh is as quick
        self.offsets, self.g_node = prev.offsets, prev.g_node
        if not changed:
            self.columns, self.gpu_index = prev.columns, prev.gpu_index
            self.n_gpus, self.n_sorted = prev.n_gpus, prev.n_sorted
            return True
        self.columns = tuple(list(column) for column in prev.columns)
        self.n_gpus, self.n_sorted = list(prev.n_gpus), list(prev.n_sorted)
        same_ids = True
        for n in changed:
            e = entries[n]
            start = self.offsets[n]
            self.n_gpus[n] = tuple(start + i for i in e.ok) if start else e.ok
            self.n_sorted[n] = [start + i for i in e.sorted]
            end = start + len(e.ids)
            for column, name in zip(self.columns, _FLAT):  # noqa: B905 - same length
                column[start:end] = getattr(e, name)
            same_ids = same_ids and e.ids == before[n].ids
        self.gpu_index = prev.gpu_index if same_ids else {gpu_id: g for g, gpu_id in enumerate(self.columns[0])}
        return True


class ColumnCache:
    """Each server's columns as the last pass built them (``Snapshot.columns``), reused by the
    next pass for a server whose GpuStates are the same objects (see ``Snapshot.columns``), and
    the cluster's columns laid end to end, patched where servers changed."""

    def __init__(self) -> None:
        self.nodes: dict[int, _NodeColumns] = {}
        self.flat: _Flat | None = None


class WorkingState:
    """The snapshot as the pass sees it, updated by every placement and preemption."""

    def __init__(self, snapshot: Snapshot) -> None:
        cfg = snapshot.config
        self.margin = cfg.memory_safety_margin_mb
        self.max_models = cfg.max_models_per_gpu
        self.binpack = cfg.strategy != "spread"
        self.now = snapshot.now

        # The GPU and server columns, from each server's own columns (``_NodeColumns``): built
        # afresh, or, with a ``ColumnCache`` in the snapshot, kept from an earlier pass for a
        # server whose GPUs are the same objects (a lone task's pass was mostly this set-up).
        now = snapshot.now
        nodes = snapshot.nodes
        cache = snapshot.columns if isinstance(snapshot.columns, ColumnCache) else None
        cached = cache.nodes if cache is not None else {}
        kept: dict[int, _NodeColumns] = {}
        entries: list[_NodeColumns] = []
        for node in nodes:
            entry = cached.get(node.id)
            if entry is None or not entry.fits(node, now, self.binpack):
                entry = _NodeColumns(node, now, self.binpack)
            kept[node.id] = entry
            entries.append(entry)
        flat = _Flat(entries, cache.flat if cache is not None else None)
        if cache is not None:
            cache.nodes = kept
            cache.flat = flat

        # Copies: the pass changes these lists in place. (g_node and gpu_index it only reads.)
        (ids, total, claimed, live, excl, shared, models, model_lower, static, base) = flat.columns
        self.g_id: list[int] = list(ids)
        self.g_node: list[int] = flat.g_node
        self.g_total: list[int] = list(total)
        self.g_claimed: list[int] = list(claimed)
        self.g_live: list[int] = list(live)
        self.g_excl: list[bool] = list(excl)
        self.g_shared: list[int] = list(shared)
        # Kept as the snapshot's dict until a placement adds a model (copy on write).
        self.g_models: list[Iterable[str]] = list(models)
        self.g_model_lower: list[str] = list(model_lower)
        # utilisation + temperature + idle part of the score
        self.g_static: list[float] = list(static)
        self.g_base: list[float] = list(base)
        self.gpu_index: dict[int, int] = flat.gpu_index

        self.n_id: list[int] = [node.id for node in nodes]
        self.n_name: list[str] = [node.name for node in nodes]
        self.n_labels: list[dict[str, str]] = [node.labels or {} for node in nodes]
        self.n_ok: list[bool] = [bool(node.schedulable) for node in nodes]
        self.n_gpus: list[tuple[int, ...]] = list(flat.n_gpus)  # schedulable GPUs of an active server
        self.n_free: list[int] = [e.free for e in entries]  # empty schedulable GPUs
        # Per server, the most memory an exclusive request can get on one of its empty GPUs:
        # lets the scan skip servers whose GPUs are too small without looking at each GPU.
        self.n_room: list[int] = [e.room for e in entries]
        # Per server, its empty schedulable GPUs best score first (exclusive requests without a model).
        # (Its lists are replaced, never changed in place: the copy of the outer list is enough.)
        self.n_sorted: list[list[int]] = list(flat.n_sorted)
        # Per server, its GPUs' idle memory as the pass began (``_NodeColumns.sig``), and the
        # servers a placement or preemption has changed since (their signatures are recomputed).
        self.n_sig: list[tuple[int, ...]] = [e.sig for e in entries]
        self.n_changed: set[int] = set()
        # Active servers with at least one GPU hosting shared allocations: n -> count of such GPUs.
        self.shared_nodes: dict[int, int] = {}
        # Affinity indexes: model -> servers with a schedulable GPU holding it (shared requests),
        # and model -> {server: empty GPUs holding it} (exclusive requests need an empty GPU).
        self.model_nodes: dict[str, dict[int, None]] = {}
        self.model_free: dict[str, dict[int, int]] = {}
        max_gpus = 0
        schedulable_total = 0
        for n, e in enumerate(entries):
            ok = e.ok
            schedulable_total += len(ok)
            if len(ok) > max_gpus:
                max_gpus = len(ok)
            if e.shared_k:
                self.shared_nodes[n] = e.shared_k
            for model in e.model_nodes:
                self.model_nodes.setdefault(model, {})[n] = None
            for model, k in e.model_free.items():
                self.model_free.setdefault(model, {})[n] = k

        # The fit rule over the live columns (the lists are only ever changed in place).
        self.gpus = Gpus(self.margin, self.g_total, self.g_claimed, self.g_live, self.g_excl, self.g_shared)
        self._qualifying = self.gpus.qualifying
        self._first_empty_fitting = self.gpus.first_empty_fitting

        self.schedulable_total = schedulable_total
        # The best GPUs of a server for a task (the score columns are only ever changed in place).
        self._pick = partial(pick, self.g_base, self.g_models, self.max_models)
        # buckets[k]: active servers with exactly k empty GPUs (dicts keep a stable order).
        self.max_k = max_gpus
        self.buckets: list[dict[int, None]] = [{} for _ in range(max_gpus + 1)]
        for n, ok in enumerate(self.n_ok):
            if ok and self.n_gpus[n]:
                self.buckets[self.n_free[n]][n] = None

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
        self.n_changed.add(n)
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
            self.n_changed.add(self.g_node[g])
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
