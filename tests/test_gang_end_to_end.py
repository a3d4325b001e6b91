"""A gang across two simulated servers, end to end: real agents, a live portal, real processes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from nodes.enrolment import issue_join_token
from scheduling.models import Allocation, Task, TaskLogChunk
from scheduling.passes import run_pass
from tests.agent_live import Agents, server_ready, start_portal, stop, wait_for

# Tasks run as an unprivileged mapped account: a system Python it may execute (the venv's may sit
# under a home directory it cannot enter); the rank check needs only the standard library.
PY = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
pytestmark = pytest.mark.django_db(transaction=True)
RANK_VARS = ("NODE_RANK", "NNODES", "NPROC_PER_NODE", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "PORTAL_TASK_ID", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def portal(tmp_path, channel_layer_on_test_db):
    url, proc = start_portal(tmp_path)
    yield url
    stop(proc)


@pytest.fixture
def roomy(settings, acme):
    """The gang may use the whole cluster: no class split, a quota of 16 GPUs."""
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=1.0, batch_share=1.0)
    acme.quota.max_gpus, acme.quota.max_gpu_memory_mb = 16, 10**7
    acme.quota.save()
    return acme


@pytest.fixture
def two_servers(tmp_path, portal):
    token_file = tmp_path / "join-token"
    token_file.write_text(issue_join_token(note="tests"))
    fleet = Agents(tmp=tmp_path, join_token_file=token_file)
    # Two servers on one machine: each agent keeps its tasks' work dirs apart (as two hosts would).
    own_work_root = Path(tempfile.mkdtemp(prefix="gang-agent-work-"))
    fleet.start("sim-01", [portal], "--address", "127.0.0.1")
    fleet.start("sim-02", [portal], "--address", "127.0.0.1", "--work-root", str(own_work_root))
    nodes = [server_ready("sim-01"), server_ready("sim-02")]
    yield nodes
    fleet.stop_all()
    shutil.rmtree(own_work_root, ignore_errors=True)


def gang(tenant, seconds: float) -> Task:
    show = (f"import os, time; print(' '.join(k + '=' + os.environ.get(k, '-') for k in {RANK_VARS!r}), "
            f"flush=True); time.sleep({seconds})")
    return Task.objects.create(tenant=tenant, name="ddp", command=f'{PY} -c "{show}"', gpu_count=16, nodes=2)


def rank_log(task: Task, rank: int, attempt: int = 0) -> dict[str, str]:
    text = "".join(TaskLogChunk.objects.filter(task=task, attempt=attempt, rank=rank).order_by("offset")
                   .values_list("data", flat=True))
    return dict(word.split("=", 1) for word in text.split())


def processes(task: Task, attempt: int) -> list[int]:
    markers = (f"TASK_ID={task.pk}\0".encode(), f"TASK_ATTEMPT={attempt}\0".encode())
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                env = Path(entry.path, "environ").read_bytes()
            except OSError:
                continue
            if all(m in env for m in markers):
                found.append(int(entry.name))
    return found


def test_a_2x8_gang_starts_one_process_per_server_with_its_rank_environment(two_servers, roomy):
    task = gang(roomy, 1)
    assert run_pass().placements == 1
    task.refresh_from_db()
    assert task.status == "assigned"
    ranks = task.current_ranks()
    assert sorted(r.node.name for r in ranks) == ["sim-01", "sim-02"]
    assert Allocation.objects.filter(task=task, released_at__isnull=True).count() == 16

    def succeeded():
        task.refresh_from_db()
        return task.status == "succeeded"

    wait_for(succeeded, 30, "the gang to succeed")
    ranks = task.current_ranks()
    # The barrier: no rank's process started before every rank was ready, and all within its timeout.
    assert min(r.started_at for r in ranks) >= max(r.ready_at for r in ranks)
    assert (max(r.started_at for r in ranks) - task.assigned_at).total_seconds() < 120
    assert task.master_addr == "127.0.0.1" and task.master_port
    for r in ranks:
        env = rank_log(task, r.rank)
        assert env == {
            "NODE_RANK": str(r.rank), "NNODES": "2", "NPROC_PER_NODE": "8", "LOCAL_WORLD_SIZE": "8",
            "WORLD_SIZE": "16", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(task.master_port),
            "PORTAL_TASK_ID": str(task.pk), "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        }
        assert r.exit_code == 0
    assert not Allocation.objects.filter(task=task, released_at__isnull=True).exists()
    assert list(task.events.values_list("to_status", flat=True)) == ["assigned", "running", "succeeded"]


def test_killing_one_rank_stops_the_other_and_requeues_the_gang(two_servers, roomy):
    task = gang(roomy, 600)
    assert run_pass().placements == 1
    wait_for(lambda: len(processes(task, 0)) >= 2 and Task.objects.get(pk=task.pk).status == "running", 30,
             "both ranks to run")
    rank1 = next(r for r in Task.objects.get(pk=task.pk).current_ranks() if r.rank == 1)
    victims = [pid for pid in processes(task, 0)
               if f"GPU_SERVER={rank1.node.name}\0".encode() in Path(f"/proc/{pid}/environ").read_bytes()]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    def requeued():
        task.refresh_from_db()
        return task.status == "pending" and task.attempt == 1

    wait_for(requeued, 30, "the gang to be requeued")
    event = task.events.get(to_status="pending")
    assert event.reason.startswith(f"rank 1 on {rank1.node.name} killed by signal"), event.reason
    assert "every rank was stopped" in event.reason
    # Rank 0's process (on the other server) is stopped too, and no GPU stays held.
    wait_for(lambda: not processes(task, 0), 20, "rank 0 to be stopped")
    assert not Allocation.objects.filter(task=task, released_at__isnull=True).exists()
