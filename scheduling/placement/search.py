"""Finding a server for a single-server request: constraints, the scan, and capacity reasons.

A request is ``(gpu_count, memory, mode, constraints)`` (its *shape*). Constraints
(``node_selector`` a subset of the server's labels, ``gpu_model`` a case-insensitive substring
of the GPU model) select the eligible servers and GPUs (``_eligible``, cached per pass). The
scan (``_search``) tries servers holding the task's model first (they win when they fit:
most such GPUs, then packing order, then score), then visits servers by their count of empty
GPUs: ``binpack`` from the fullest that can still hold the task, ``spread`` from the
emptiest; shared requests try servers already hosting shared work first with binpack. Among
the first ``SCAN_LIMIT`` fitting servers of a level the best-scoring wins. A "nothing fits
this request" answer is remembered for the rest of the pass (capacity only shrinks between
preemptions, and a preemption forgets it).
"""

from __future__ import annotations

from collections.abc import Iterable

from scheduling.placement import reasons
from scheduling.placement.fit import SHARED, WHOLE
from scheduling.placement.state import WorkingState
from scheduling.placement.types import PendingTask

# How many fitting servers of the first fitting level are compared by score before the
# scan stops: enough for the load-balance score to matter, few enough to stay in microseconds.
SCAN_LIMIT = 3
# Servers holding the task's model examined before falling back to the plain scan.
AFFINITY_SCAN_LIMIT = 12


class Search(WorkingState):
    """The single-server scan over the working state (mixed into ``planner.Pass``)."""

    elig_cache: dict[tuple, dict[int, tuple[int, ...]]]
    sig_cache: dict[tuple, set[tuple[int, ...]]]
    best_cache: dict[tuple, int]
    nofit: set[tuple]

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

    def _static_reason(self, shape: tuple, elig: dict[int, tuple[int, ...]]) -> str:
        """Why no active server could ever hold this shape ("" when one could)."""
        c, mem, mode, ckey = shape
        selector, model = ckey
        if not elig:
            if selector and not self._eligible((selector, "")):
                return reasons.no_labels(selector)
            if model:
                return reasons.no_gpu_model(selector, model)
            return reasons.no_schedulable_gpus()
        # Servers reduced to the memory each GPU offers when idle (sorted, largest first): few
        # distinct signatures per cluster. An idle GPU still uses some memory (driver, context):
        # a server's baseline is the least any of its empty GPUs reports now (0 if none is empty).
        sigs = self.sig_cache.get(ckey)
        if sigs is None:
            total = self.g_total
            n_gpus, n_sig, changed = self.n_gpus, self.n_sig, self.n_changed
            sigs = set()
            for n, gl in elig.items():
                if gl is n_gpus[n] and n not in changed:  # all its GPUs, as the pass began
                    sigs.add(n_sig[n])
                    continue
                base = self._idle_baseline(gl)
                sigs.add(tuple(sorted((total[g] - base for g in gl), reverse=True)))
            self.sig_cache[ckey] = sigs
        largest = max(len(sig) for sig in sigs)
        if largest < c:
            return reasons.too_few_gpus(c, ckey, largest)
        need = self.margin + (mem if mode != WHOLE else 0)
        best = max(sum(1 for t in sig if t >= need) for sig in sigs)
        if best < c:
            base = max((self._idle_baseline(gl) for gl in elig.values()), default=0)
            return reasons.too_little_memory(c, mem, mode, self.margin, ckey, base, best)
        return ""

    def _idle_baseline(self, gl: tuple[int, ...]) -> int:
        """Memory a server's GPUs use with nothing on them: the least its empty GPUs report."""
        g_live = self.g_live
        return min([g_live[g] for g in self._empty_of(gl)], default=0)

    # ------------------------------------------------------------------ capacity at the end of the pass

    def _best_count(self, mem: int, mode: str, ckey: tuple) -> int:
        """Most GPUs this request could get on one server now (memoised per request within the pass end)."""
        key = (mem, mode, ckey)
        best = self.best_cache.get(key)
        if best is not None:
            return best
        elig = self.elig_cache[ckey]
        qualifying = self._qualifying
        best = 0
        if mode == SHARED:
            for gl in elig.values():
                k = len(qualifying(gl, mem, mode, None))
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
                        k = len(qualifying(gl, mem, mode, None))
                        if k > best:
                            best = k
                            if best >= k_free:
                                break
        self.best_cache[key] = best
        return best

    def _capacity_reason(self, shape: tuple) -> str:
        c, mem, mode, ckey = shape
        return reasons.capacity(c, mem, mode, ckey, self._best_count(mem, mode, ckey))

    # ------------------------------------------------------------------ the scan

    def _search(self, task: PendingTask, c: int, mem: int | None, mode: str, shape: tuple,
                elig: dict[int, tuple[int, ...]], excluded: frozenset[int] | None,
                only_node: int | None) -> tuple[int, tuple[int, ...]] | None:
        """The server and GPUs a request gets now (None: nothing fits); ``only_node`` limits
        the search to one server (after a preemption freed it)."""
        need = mem if mem is not None else 0
        model = task.model_name
        qualifying = self._qualifying
        if only_node is not None:
            gl = elig.get(only_node)
            if not gl:
                return None
            q = qualifying(gl, need, mode, excluded)
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
                    q = qualifying(gl, need, mode, excluded)
                    if len(q) >= c:
                        s, gpus = self._pick(q, c, model)
                        loaded = sum(1 for g in gpus if model in g_models[g])
                        if loaded:
                            fits += 1
                            key2 = (loaded, -n_free[n] if self.binpack else n_free[n], s)
                            if best_key is None or key2 > best_key:
                                best, best_key = (n, gpus), key2
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
        first_fit = self._first_empty_fitting
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
                    picked = first_fit(n_sorted[n], c, room_needed, excluded)
                    if len(picked) < c:
                        continue
                    s = sum(map(g_base.__getitem__, picked))
                    gpus = tuple(sorted(picked))
                else:
                    q = qualifying(gl, need, mode, excluded)
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
