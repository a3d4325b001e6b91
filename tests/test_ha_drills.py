"""HA drills on a real multi-host deployment (``tests.ha_cluster``): PostgreSQL, two web
nodes behind the shipped HAProxy config, two schedulers, the q cluster and three agents, each on its
own network namespace. Every drill ends by checking that no GPU was held twice, no
accepted task was lost and no task runs on two servers.

Time is scaled (see ``tests.ha_cluster``): servers are lost after 5 s of silence
instead of 30 s, so the "5 minute" portal outage is 25 s here (five timeouts), and
the agents' lease is 60 s (above every outage drilled, as 900 s is above 5 minutes).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.conftest import wait_for
from tests.ha_cluster import (
    HEARTBEAT_INTERVAL_S,
    LOST_TIMEOUT_S,
    Cluster,
    Viewer,
    namespaces_unavailable,
    running_copies,
)

_why_not = namespaces_unavailable()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=f"HA drills skipped: {_why_not}")

OUTAGE_S = 5 * LOST_TIMEOUT_S
LONG = "sleep 600"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp=tmp_path_factory.mktemp("ha-drill"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh(cluster):
    """Each drill starts with every process up and no task left over."""
    for key, start in (("web1", cluster.start_web), ("web2", cluster.start_web),
                       ("sched1", cluster.start_scheduler), ("sched2", cluster.start_scheduler)):
        if cluster.procs[key].poll() is not None:
            start(key)
    assert cluster.procs["qcluster"].poll() is None, "the q cluster died"
    cluster.query("UPDATE scheduling_task SET status = 'cancelled', finished_at = now() "
                  "WHERE status IN ('pending', 'assigned', 'running') RETURNING id")
    cluster.query("UPDATE scheduling_allocation SET released_at = clock_timestamp() "
                  "WHERE released_at IS NULL RETURNING id")
    wait_for(lambda: not running_copies(), 30, "leftover tasks to be stopped by their agents")
    wait_for(lambda: cluster.scalar("SELECT count(*) FROM nodes_node WHERE status = 'active' "
                                    "AND last_heartbeat_at > now() - interval '2 seconds'") == 3, 30,
             "all three servers to be active and heard from")
    yield cluster
    cluster.assert_invariants()


def running_everywhere(cluster: Cluster, count: int) -> dict[int, tuple[str, int, str]]:
    ids = [cluster.submit(LONG, name=f"long-{i}") for i in range(count)]
    wait_for(lambda: all(cluster.task(i)[0] == "running" for i in ids), 30, "the tasks to run")
    wait_for(lambda: all(i in running_copies() for i in ids), 15, "their processes")
    return {i: cluster.task(i) for i in ids}


def test_killing_the_scheduler_holding_the_lock_hands_over_to_the_other(fresh):
    cluster = fresh
    stop_load = threading.Event()

    def load() -> None:  # keeps passes running, so the lock is held now and then
        while not stop_load.is_set():
            cluster.submit("true", name="load")

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        def holder() -> str | None:
            # A scheduler's: the drill's django-q cluster runs requested passes too, and holds
            # the lock now and then (seen in CI on a slow day: "qcluster" was the holder).
            return cluster.scalar(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.objid = %s AND l.granted "
                "AND a.application_name LIKE 'drill-sched%%'", (0x5C4ED,))

        name = wait_for(holder, 30, "a scheduler to hold the lock")
        victim = name.split()[0].removeprefix("drill-")  # "drill-sched1 host:pid:scheduler"
        assert victim in ("sched1", "sched2")
        os.killpg(cluster.procs[victim].pid, signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        stop_load.set()
        loader.join(15)
    probe = cluster.submit("true", name="after the kill")
    wait_for(lambda: cluster.task(probe)[0] in ("assigned", "running", "succeeded"), 10,
             "the surviving scheduler to place a task")
    takeover_s = time.monotonic() - killed_at
    # The 1 s target is measured by bench/failover.py on a quiet machine; here (a shared,
    # loaded CI box) the drill only proves the survivor takes over by itself.
    assert takeover_s < 10
    survivor = "sched2" if victim == "sched1" else "sched1"
    assert cluster.procs[survivor].poll() is None
    cluster.procs[victim].wait(10)


def test_killing_a_web_node_moves_agents_and_viewers_and_disturbs_no_task(fresh):
    cluster = fresh
    before = running_everywhere(cluster, 3)
    pids_before = {task: _pids(task) for task in before}
    viewer = Viewer(cluster)
    try:
        wait_for(lambda: viewer.connects, 20, "the operator's page to connect")
        # Kill one web node, then (once it is back) the other: whichever node the page and
        # each agent were on, they are moved at least once.
        for victim in ("web1", "web2"):
            other = "web2" if victim == "web1" else "web1"
            os.killpg(cluster.procs[victim].pid, signal.SIGKILL)
            cluster.procs[victim].wait(10)
            killed_at = time.monotonic()
            wait_for(lambda: cluster.scalar("SELECT count(*) FROM nodes_node WHERE status = 'active' AND "
                                            "last_heartbeat_at > now() - interval '2 seconds'") == 3, 20,
                     f"the agents to heartbeat through {other}")
            # A page that was on the victim has seen its socket cut by now (the agents took
            # longer): submit once it is back, or every push can go out before it rejoins.
            wait_for(lambda: viewer.connected, 20, f"the operator's page to be connected through {other}")
            pushed = cluster.submit("true", name=f"pushed while {victim} is down", attempts=5)
            wait_for(lambda since=killed_at: viewer.pushes_after(since), 20,
                     f"a push to the operator's page through {other}")
            wait_for(lambda task=pushed: cluster.task(task)[0] == "succeeded", 20, f"a new task to run via {other}")
            cluster.start_web(victim)
            # Back in HAProxy's pool: its health checks are its first requests (it registers then).
            wait_for(lambda v=victim: cluster.scalar(
                "SELECT count(*) FROM portal_controlplaneserver WHERE role = 'web' AND pid = %s",
                (cluster.procs[v].pid,)), 30, f"HAProxy to check {victim} again")
        assert len(viewer.connects) >= 2, "the page never had to move"
    finally:
        viewer.close()
    assert {task: cluster.task(task) for task in before} == before  # same status, attempt, server
    assert {task: _pids(task) for task in before} == pids_before  # the very same processes


def test_an_agent_cut_off_for_two_timeouts_is_lost_its_tasks_run_elsewhere_and_stale_copies_die(fresh):
    cluster = fresh
    before = running_everywhere(cluster, 3)
    victim = next(iter(before.values()))[2]  # a server that runs at least one of them
    stranded = [task for task, (_, _, server) in before.items() if server == victim]

    cluster.net.cut(victim)
    try:
        wait_for(lambda: all(cluster.task(t)[2] not in (None, victim) and cluster.task(t)[0] == "running"
                             for t in stranded), 2 * LOST_TIMEOUT_S + 20,
                 "the stranded tasks to be requeued and run elsewhere")
        assert all(victim in running_copies()[t] for t in stranded)  # still running there, unseen
        time.sleep(max(0.0, 2 * LOST_TIMEOUT_S - 1))  # the cut lasts two timeouts, as drilled
    finally:
        cluster.net.mend(victim)
    mended_at = time.monotonic()
    wait_for(lambda: not any(victim in running_copies().get(t, set()) for t in stranded),
             HEARTBEAT_INTERVAL_S + 5, f"{victim} to kill its stale copies on its first heartbeat back")
    killed_after_s = time.monotonic() - mended_at
    assert killed_after_s < HEARTBEAT_INTERVAL_S + 5
    for task in stranded:
        status, attempt, server = cluster.task(task)
        assert (status, attempt) == ("running", 1) and server != victim
    untouched = {t: v for t, v in before.items() if t not in stranded}
    assert {t: cluster.task(t) for t in untouched} == untouched


def test_a_long_outage_of_every_web_node_and_scheduler_restarts_nothing_and_spends_no_retry(fresh):
    cluster = fresh
    before = running_everywhere(cluster, 4)
    pids_before = {task: _pids(task) for task in before}
    outage_began = cluster.scalar("SELECT now()")
    for key in ("web1", "web2", "sched1", "sched2"):
        os.killpg(cluster.procs[key].pid, signal.SIGKILL)
    for key in ("web1", "web2", "sched1", "sched2"):
        cluster.procs[key].wait(10)
    time.sleep(OUTAGE_S)  # the outage itself: nothing of the portal runs meanwhile
    for key in ("web1", "web2"):
        cluster.start_web(key)
    for key in ("sched1", "sched2"):
        cluster.start_scheduler(key)
    # Long enough for a wrong judgement to show: sweeps run every 0.5 s, servers are lost after 5 s.
    wait_for(lambda: cluster.scalar("SELECT count(*) FROM nodes_node WHERE status = 'active' AND "
                                    "last_heartbeat_at > now() - interval '2 seconds'") == 3, 30,
             "the agents to be heard again")
    time.sleep(2 * LOST_TIMEOUT_S)
    assert {task: cluster.task(task) for task in before} == before  # zero restarts, zero retries
    assert {task: _pids(task) for task in before} == pids_before
    assert cluster.scalar("SELECT count(*) FROM portal_alert WHERE kind = 'server_lost' AND created_at > %s",
                          (outage_began,)) == 0
    assert cluster.scalar("SELECT count(*) FROM nodes_node WHERE status <> 'active'") == 0


def test_restarting_postgresql_under_submit_load_loses_no_accepted_task_and_restarts_nothing(fresh):
    cluster = fresh
    before = running_everywhere(cluster, 2)
    pids_before = {task: _pids(task) for task in before}
    accepted: list[int] = []
    stop_load = threading.Event()

    def load() -> None:
        while not stop_load.is_set():
            try:
                accepted.append(cluster.submit("true", name="under load"))
            except Exception:  # refused while the database is down: not accepted, not counted
                time.sleep(0.1)

    viewer = Viewer(cluster)
    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        wait_for(lambda: len(accepted) >= 5 and viewer.connects, 30, "submits and a connected page")
        cluster.stop_db()
        # Down for longer than two lost timeouts: its own outage must not make the portal
        # declare the servers lost when it is back.
        time.sleep(2 * LOST_TIMEOUT_S + 1)
        cluster.start_db()
        restarted_at = time.monotonic()
        wait_for(lambda: viewer.pushes_after(restarted_at), 10, "live pushes to resume within 10 s")
        count_after = len(accepted)
        wait_for(lambda: len(accepted) > count_after + 3, 20, "submits to be accepted again")
    finally:
        stop_load.set()
        loader.join(15)
        viewer.close()
    ids = set(accepted)
    stored = {row[0] for row in cluster.query("SELECT id FROM scheduling_task WHERE id = ANY(%s)", (list(ids),))}
    assert stored == ids, f"accepted but lost: {sorted(ids - stored)}"
    wait_for(lambda: cluster.scalar("SELECT count(*) FROM scheduling_task WHERE id = ANY(%s) AND status = "
                                    "'succeeded'", (list(ids),)) == len(ids), 60,
             "every accepted task to run, with no process restarted by hand")
    assert {task: cluster.task(task) for task in before} == before  # zero restarts, zero retries
    assert {task: _pids(task) for task in before} == pids_before
    for key in ("web1", "web2", "sched1", "sched2", "qcluster"):
        assert cluster.procs[key].poll() is None, f"{key} died"
    # The q cluster reconnected by itself: it runs tasks again (those its dead pusher had
    # claimed come back after django-q's retry period, beyond this drill).
    wait_for(lambda: cluster.scalar("SELECT count(*) FROM django_q_task WHERE started > pg_postmaster_start_time()"),
             60, "the q cluster to run tasks again after the restart")
    # ...and its worker keeps beating in the control-plane registry.
    wait_for(lambda: cluster.scalar("SELECT count(*) FROM portal_controlplaneserver WHERE role = 'worker' "
                                    "AND last_seen_at > pg_postmaster_start_time()"), 30,
             "the q cluster's worker to beat in the registry after the restart")


def _pids(task_id: int) -> set[int]:
    from tests.agent_live import task_processes

    return {pid for server in ("agent1", "agent2", "agent3") for pid in task_processes(task_id, server)}
