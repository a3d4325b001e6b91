"""Reclaim and preemption: freeing GPUs for a task blocked by capacity.

Two pools of victims, tried in this order (``_victim_options``):

1. **Reclaim** (``allow_borrowing``): a task of a class within its own share, while the other
   class holds more than its cap, may preempt that class's running tasks (never of higher
   priority than the task, and no more GPUs than are borrowed): "borrowed batch GPUs
   reclaimed for online task #N".
2. **Preemption** (``config.preemption`` lists the task's priority): LOW batch running tasks
   may be preempted: "preempted by CRITICAL task #N".

For one server the victims are taken newest first (or biggest first, whichever needs fewer)
until the task fits, then those that turn out unnecessary are spared; the server needing the
fewest victims wins (then the fewest GPUs freed). A gang picks the cheapest ``nodes`` servers
of one topology group. Victims keep off the GPUs the task must keep off (booked and backfill
reservations). Each victim is released in the working state and listed as a ``Preemption``;
a release forgets the pass's "nothing fits" and "no victims help" answers.
"""

from __future__ import annotations

from collections.abc import Iterator

from scheduling.placement import reasons
from scheduling.placement.fit import Gpus
from scheduling.placement.gangs import Gangs, topology_group
from scheduling.placement.order import LOW, PRIORITY_NAMES
from scheduling.placement.types import PendingTask, Plan, Preemption, RunningTask


class Preempting(Gangs):
    """Victim choice and release (mixed into ``planner.Pass``)."""

    plan: Plan
    preempt_allowed: set[int]
    novictims: set[tuple]
    victim_pools: dict[str, dict[int, list[RunningTask]]]

    def _victim_options(self, task: PendingTask, c: int) -> Iterator[tuple[str, int, int | None, str]]:
        """``(pool, max_priority, budget, reason)`` for each pool ``task`` may take victims from, in order."""
        cls = task.workload_class
        if self.cfg.allow_borrowing and cls in self.class_cap:
            other = self._other(cls)
            borrowed = self.class_used[other] - self.class_cap[other]
            if borrowed > 0 and self.class_used[cls] + c <= self.class_cap[cls]:
                yield f"class:{other}", task.priority, borrowed, reasons.reclaimed(other, cls, task.id)
        if task.priority in self.preempt_allowed and task.priority > LOW:
            yield "low-batch", LOW, None, reasons.preempted_by(PRIORITY_NAMES[task.priority], task.id)

    def _reclaim_or_preempt(self, task: PendingTask, c: int, mem: int | None, mode: str,
                            elig: dict[int, tuple[int, ...]],
                            excluded: frozenset[int] | None) -> tuple[int, tuple[int, ...]] | None:
        for pool, max_priority, budget, reason in self._victim_options(task, c):
            found = self._with_victims(task, c, mem, mode, elig, excluded, pool=pool, max_priority=max_priority,
                                       budget=budget, reason=reason)
            if found is not None:
                return found
        return None

    def _gang_reclaim_or_preempt(self, task: PendingTask, shape: tuple, elig: dict[int, tuple[int, ...]],
                                 excluded: frozenset[int] | None) -> list[tuple[int, tuple[int, ...]]] | None:
        for pool, max_priority, budget, reason in self._victim_options(task, task.gpu_count):
            found = self._gang_with_victims(task, shape, elig, excluded, pool=pool, max_priority=max_priority,
                                            budget=budget, reason=reason)
            if found is not None:
                return found
        return None

    def _preempt(self, victim: RunningTask, task: PendingTask, reason: str) -> None:
        """Release ``victim`` for ``task``: the working state takes its GPUs and usage back, and
        the pass's answers that assumed less capacity are forgotten."""
        self.release(victim)
        # More capacity than before: earlier "nothing fits" answers may be wrong now.
        self.nofit.clear()
        self.novictims.clear()
        for by_node in self.victim_pools.values():
            for victims in by_node.values():
                if victim in victims:
                    victims.remove(victim)
        self.plan.preemptions.append(Preemption(task_id=victim.id, by_task_id=task.id, reason=reason))

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
            self._preempt(v, task, reason)
        return self._search(task, c, mem, mode, (), elig, excluded, n)

    def _victims_on(self, gl: tuple[int, ...], order: list[RunningTask], c: int, need: int, mode: str,
                    excluded: frozenset[int] | None, budget: int | None) -> list[RunningTask] | None:
        """Victims taken in ``order`` until the task fits on this server, minus those not needed."""
        state = self.sim_node(gl)
        chosen: list[RunningTask] = []
        freed = 0
        for v in order:
            if budget is not None and freed >= budget:
                return None
            chosen.append(v)
            freed += len(v.gpu_ids)
            self.sim_release(state, v)
            if self._sim_count(state, gl, need, mode, excluded) >= c:
                break
        else:
            return None
        # Spare victims that turn out unnecessary (a later one may have been enough alone).
        for v in list(chosen):
            trial = [x for x in chosen if x is not v]
            st = self.sim_node(gl)
            for x in trial:
                self.sim_release(st, x)
            if self._sim_count(st, gl, need, mode, excluded) >= c:
                chosen = trial
        return chosen

    def _sim_count(self, state: Gpus, gl: tuple[int, ...], mem: int, mode: str,
                   excluded: frozenset[int] | None) -> int:
        return len(state.qualifying(gl, mem, mode, excluded))

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
            group = topology_group(self.n_labels[n], topo)
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
                self._preempt(v, task, reason)
        found = []
        for _v, _gpus, n, _victims in choice[1]:
            q = self._qualifying(elig[n], mem, mode, excluded)
            if len(q) < k:  # pragma: no cover - the victims were simulated on exactly these GPUs
                return None
            found.append((n, self._pick(q, k, task.model_name)[1]))
        return found
