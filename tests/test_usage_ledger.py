"""The usage ledger against a history computed by hand (``tests.usage_history``).

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

import importlib
from datetime import date, timedelta

import pytest

from nodes.models import GPU
from scheduling.models import Allocation, GpuAllocationCount, Task
from scheduling.usage import (
    ROLLUP_LAG,
    ReportError,
    allocations_per_gpu,
    month_bounds,
    report,
    roll_up,
    sample_utilisation,
)
from tests.usage_history import NOW, at, make_history


@pytest.fixture
def history(acme, globex, alice, bob, carol):
    return make_history(acme, globex, alice, bob, carol)


def hours(rows, key: str) -> dict:
    return {getattr(r, key): round(r.gpu_hours, 6) for r in rows}


def check_october_and_november() -> None:
    october = month_bounds(date(2026, 10, 1))
    november = month_bounds(date(2026, 11, 1))
    assert hours(report(*october, ["tenant"], now=NOW), "tenant") == {"acme": 7.5, "globex": 4.0}
    assert hours(report(*october, ["user"], now=NOW), "user") == {"alice": 6.5, "bob": 1.0, "carol": 4.0}
    assert hours(report(*november, ["tenant"], now=NOW), "tenant") == {"acme": 3.0, "globex": 2.0}
    rows = report(*october, ["tenant", "workload_class"], now=NOW)
    assert {(r.tenant, r.workload_class): round(r.gpu_hours, 6) for r in rows} == {
        ("acme", "batch"): 7.5, ("globex", "batch"): 2.0, ("globex", "online"): 2.0,
    }
    # A period cut in the middle of a day (and of A's, B's and C's intervals).
    mid = report(at(10, 1, 11), at(10, 2, 3), ["tenant"], now=NOW)
    assert hours(mid, "tenant") == {"acme": 2.75, "globex": 0.5}
    # Memory: A held 2 x 40 GB for 2 h.
    (row,) = report(at(10, 1, 0), at(10, 2, 0), ["user"], now=NOW)
    assert row.gpu_memory_mb_seconds == 2 * 40_000 * 7200
    (total,) = report(*october, [], now=NOW)
    assert round(total.gpu_hours, 6) == 11.5


@pytest.mark.django_db
def test_reports_match_the_hand_computed_history_before_any_roll_up(history):
    check_october_and_november()


@pytest.mark.django_db
def test_reports_are_the_same_once_closed_intervals_are_rolled_up(history):
    roll_up(NOW)
    roll_up(NOW)  # a second roll-up at the same time adds nothing twice
    check_october_and_november()


@pytest.mark.django_db
def test_a_roll_up_between_two_reports_changes_nothing_for_intervals_crossing_it(history):
    # Watermark in the middle of October: A-D rolled up, E (released Nov 1) still raw.
    roll_up(at(10, 20, 0))
    check_october_and_november()


@pytest.mark.django_db
def test_server_task_and_model_groupings_read_the_raw_intervals(history):
    roll_up(NOW)
    october = month_bounds(date(2026, 10, 1))
    assert hours(report(*october, ["server"], now=NOW), "server") == {"usage-01": 11.5}
    assert hours(report(*october, ["gpu_model"], now=NOW), "gpu_model") == {"NVIDIA A100 80GB": 11.5}
    by_task = {Task.objects.get(pk=r.task).name: round(r.gpu_hours, 6) for r in report(*october, ["task"], now=NOW)}
    assert by_task == {"A": 4.0, "B": 1.0, "C": 2.0, "D": 2.5, "E": 2.0}


@pytest.mark.django_db
def test_scoping_to_a_tenant_or_a_user(history, acme, bob):
    october = month_bounds(date(2026, 10, 1))
    for _ in range(2):
        assert hours(report(*october, ["user"], tenant_ids=[acme.pk], now=NOW), "user") == {"alice": 6.5, "bob": 1.0}
        assert hours(report(*october, ["user"], user_ids=[bob.pk], now=NOW), "user") == {"bob": 1.0}
        roll_up(NOW)


@pytest.mark.django_db
def test_utilisation_is_weighted_by_allocated_gpu_seconds(history, acme):
    node = history
    GPU.objects.filter(node=node, index=0).update(utilization_pct=90)
    GPU.objects.filter(node=node, index=1).update(utilization_pct=10)
    node.status, node.last_heartbeat_at = "active", at(10, 1, 11)
    node.save()
    sample_utilisation(at(10, 1, 11))
    day = (at(10, 1, 0), at(10, 2, 0))
    (raw,) = report(*day, ["tenant"], now=NOW)
    assert raw.utilization_pct == 50.0  # A: 2 h at 90 % and 2 h at 10 %
    roll_up(NOW)
    (rolled,) = report(*day, ["tenant"], now=NOW)
    assert rolled.utilization_pct == 50.0
    # No samples at all on Oct 3: utilisation unknown, not zero.
    (unknown,) = report(at(10, 3, 0), at(10, 4, 0), ["tenant"], now=NOW)
    assert unknown.utilization_pct is None


@pytest.mark.django_db
def test_bad_arguments_are_refused():
    with pytest.raises(ReportError):
        report(at(10, 2, 0), at(10, 1, 0), ["tenant"])
    with pytest.raises(ReportError):
        report(at(10, 1, 0), at(10, 2, 0), ["colour"])


def allocations_by_index(node) -> dict[int, int]:
    counts = allocations_per_gpu()
    return {g.index: counts.get(g.pk, 0) for g in GPU.objects.filter(node=node)}


@pytest.mark.django_db
def test_allocations_per_gpu_are_the_same_before_between_and_after_roll_ups(history):
    # GPU 0: A and D's second attempt; 1: A and E; 2: B, C and the open F; 3: D's first attempt.
    expected = {0: 2, 1: 2, 2: 3, 3: 1}
    assert allocations_by_index(history) == expected
    roll_up(at(10, 20, 0))  # A-D rolled up; E (released Nov 1) and F (open) still raw
    assert GpuAllocationCount.objects.count() == 4
    assert allocations_by_index(history) == expected
    roll_up(NOW)
    roll_up(NOW)  # nothing twice
    assert allocations_by_index(history) == expected
    assert sorted(GpuAllocationCount.objects.values_list("allocations", flat=True)) == [1, 2, 2, 2]


@pytest.mark.django_db
def test_an_allocation_released_after_the_roll_up_is_counted_once_raw_then_once_rolled(history):
    roll_up(NOW)
    f = Allocation.objects.get(released_at__isnull=True)
    Allocation.objects.filter(pk=f.pk).update(released_at=NOW)
    assert allocations_by_index(history)[2] == 3
    roll_up(NOW + ROLLUP_LAG + timedelta(seconds=1))
    assert allocations_by_index(history)[2] == 3
    assert GpuAllocationCount.objects.get(gpu=f.gpu_id).allocations == 3


@pytest.mark.django_db
def test_the_migration_seeds_the_counts_with_what_the_watermark_already_covers(history):
    from django.db import connection

    seed = importlib.import_module("scheduling.migrations.0018_gpu_allocation_counts").SEED_SQL
    roll_up(at(10, 20, 0))
    GpuAllocationCount.objects.all().delete()  # as before the migration: rolled up, not counted
    with connection.cursor() as cursor:
        cursor.execute(seed)
    assert allocations_by_index(history) == {0: 2, 1: 2, 2: 3, 3: 1}
    assert sorted(GpuAllocationCount.objects.values_list("allocations", flat=True)) == [1, 1, 2, 2]
