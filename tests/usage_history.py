"""A small allocation history computed by hand, shared by the usage tests.

Server usage-01 has 4 GPUs of 80,000 MB (so shared fractions are round):

- A  acme/alice  batch   exclusive GPUs 0,1  Oct 1 10:00-12:00          -> 4 GPU-h
- B  acme/bob    batch   shared 20 GB GPU 2  Oct 2 00:00-04:00 (1/4)    -> 1 GPU-h
- C  globex/carol batch  shared 40 GB GPU 2  Oct 2 02:00-06:00 (1/2)    -> 2 GPU-h
- D  acme/alice  batch   GPU 3 Oct 3 00:00-01:00, preempted, requeued,
                         GPU 0 Oct 3 02:00-03:30                        -> 2.5 GPU-h
- E  globex/carol online GPU 1 Oct 31 22:00 - Nov 1 02:00               -> 2 h in Oct, 2 h in Nov
- F  acme/alice  online  GPU 2 from Nov 15 09:00, still running; now = Nov 15 12:00 -> 3 GPU-h

October: acme 4 + 1 + 2.5 = 7.5, globex 2 + 2 = 4; alice 6.5, bob 1, carol 4.
"""

from __future__ import annotations

from datetime import UTC, datetime

from nodes.models import GPU
from scheduling.models import Allocation, Task
from tests.conftest import make_server

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


def at(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


def make_history(acme, globex, alice, bob, carol):
    node = make_server("usage-01", gpus=4, memory_mb=80_000, model="NVIDIA A100 80GB")
    gpu = {g.index: g for g in GPU.objects.filter(node=node)}

    def task(name, tenant, user, cls="batch", status="succeeded", share="exclusive"):
        return Task.objects.create(name=name, tenant=tenant, submitter=user, command="true", workload_class=cls,
                                   status=status, share_mode=share, gpu_memory_mb=40_000)

    def alloc(t, index, start, end, memory_mb=40_000, exclusive=True):
        Allocation.objects.create(task=t, gpu=gpu[index], node=node, memory_mb=memory_mb, exclusive=exclusive,
                                  allocated_at=start, released_at=end)

    a = task("A", acme, alice)
    alloc(a, 0, at(10, 1, 10), at(10, 1, 12))
    alloc(a, 1, at(10, 1, 10), at(10, 1, 12))
    b = task("B", acme, bob, share="shared")
    alloc(b, 2, at(10, 2, 0), at(10, 2, 4), memory_mb=20_000, exclusive=False)
    c = task("C", globex, carol, share="shared")
    alloc(c, 2, at(10, 2, 2), at(10, 2, 6), memory_mb=40_000, exclusive=False)
    d = task("D", acme, alice)
    alloc(d, 3, at(10, 3, 0), at(10, 3, 1))  # first attempt, preempted
    alloc(d, 0, at(10, 3, 2), at(10, 3, 3, 30))  # the requeued attempt
    e = task("E", globex, carol, cls="online")
    alloc(e, 1, at(10, 31, 22), at(11, 1, 2))
    f = task("F", acme, alice, cls="online", status="running")
    alloc(f, 2, at(11, 15, 9), None)
    return node
