"""The fit rule, written once: may a GPU take one more GPU's worth of a request now?

Per GPU, ``used = max(memory_claimed_mb, memory_used_live_mb)``. A request asks for ``mem``
MB per GPU in one of three modes:

- ``EXCLUSIVE``: the GPU has no allocation at all (not exclusive, no shared allocation,
  nothing claimed) and ``live + mem + margin <= total``;
- ``SHARED``: the GPU has no exclusive allocation and ``used + mem + margin <= total``;
- ``WHOLE`` (no memory figure): as ``EXCLUSIVE`` with ``mem = 0``; the allocation then
  claims the GPU's total memory.

``Gpus.qualifying`` applies the rule to a server's GPUs, over per-GPU columns indexable by
GPU: the working state's lists (``state.WorkingState.gpus``) or a simulated server's dicts
(``state.WorkingState.sim_node``, on which backfill and preemption replay ends). Everything
in the package that decides whether a request fits calls it;
``Gpus.first_empty_fitting`` is the same inequality for GPUs already known to be empty, kept
separate because the scan's fast path runs it for every server it visits. (The working
state's ``n_room``, the largest ``total - live`` among a server's empty GPUs, is only an
upper bound that lets the scan skip a server without looking at its GPUs.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Fit modes of a request.
EXCLUSIVE = "x"
SHARED = "s"
WHOLE = "w"
# First item of a gang's shape (a single-server shape starts with its GPU count).
GANG = "gang"


class Column(Protocol):
    def __getitem__(self, g: int, /) -> int: ...


def mode_of(memory_mb: int | None, exclusive: bool) -> str:
    """The fit mode of a task's request."""
    if memory_mb is None:
        return WHOLE
    return EXCLUSIVE if exclusive else SHARED


def is_empty(excl: bool, shared: int, claimed: int) -> bool:
    """No allocation of any kind on the GPU: what exclusive and whole-GPU requests need."""
    return not excl and not shared and not claimed


def empty_gpus(gl: Sequence[int], excl: Column, shared: Column, claimed: Column) -> list[int]:
    """The GPUs of ``gl`` with no allocation (``is_empty``), in its order."""
    return [g for g in gl if not excl[g] and not shared[g] and not claimed[g]]


class Gpus:
    """The per-GPU columns the rule reads, indexable by GPU: the working state's lists, or a
    simulated server's dicts (``total`` is always the working state's, memory never changes)."""

    __slots__ = ("claimed", "excl", "live", "margin", "shared", "total")

    def __init__(self, margin: int, total: Column, claimed: Column, live: Column, excl: Column,
                 shared: Column) -> None:
        self.margin = margin
        self.total = total
        self.claimed = claimed
        self.live = live
        self.excl = excl
        self.shared = shared

    def qualifying(self, gl: Sequence[int], mem: int, mode: str, excluded: frozenset[int] | None) -> list[int]:
        """The GPUs of ``gl`` (in its order) that fit ``mem`` MB more in ``mode``, minus ``excluded``."""
        total = self.total
        claimed = self.claimed
        live = self.live
        excl = self.excl
        margin = self.margin
        out = []
        if mode == SHARED:
            for g in gl:
                if excl[g] or (excluded is not None and g in excluded):
                    continue
                c = claimed[g]
                lv = live[g]
                if (c if c > lv else lv) + mem + margin <= total[g]:
                    out.append(g)
        else:
            shared = self.shared
            for g in gl:
                if excl[g] or shared[g] or claimed[g] or (excluded is not None and g in excluded):
                    continue
                if live[g] + mem + margin <= total[g]:
                    out.append(g)
        return out

    def first_empty_fitting(self, empty: Sequence[int], c: int, room_needed: int,
                            excluded: frozenset[int] | None) -> list[int]:
        """The first ``c`` GPUs of ``empty`` (GPUs known to have no allocation) that fit
        ``room_needed = mem + margin``: the exclusive rule above, stopping at ``c``."""
        total = self.total
        live = self.live
        picked = []
        for g in empty:
            if (excluded is None or g not in excluded) and live[g] + room_needed <= total[g]:
                picked.append(g)
                if len(picked) == c:
                    break
        return picked
