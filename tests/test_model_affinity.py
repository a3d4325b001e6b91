"""Model affinity that works: the portal keeps each GPU's model cache, and the score then applies."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from nodes.models import GPU, model_cache
from scheduling import lifecycle
from scheduling.models import Allocation, Task
from scheduling.passes import run_pass
from tests.test_agent_api import API, agent_client, enrolled, gpu_report  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_the_cache_keeps_the_most_recently_used_models_and_forgets_expired_ones():
    cache = {"a": (T0 - timedelta(seconds=30)).isoformat(), "b": (T0 - timedelta(seconds=10)).isoformat(),
             "old": (T0 - timedelta(hours=2)).isoformat()}
    assert list(model_cache(cache, now=T0, ttl_s=3600)) == ["a", "b"]  # oldest use first
    assert list(model_cache(cache, now=T0, ttl_s=3600, used=["c"], max_models=2)) == ["b", "c"]
    assert list(model_cache(cache, now=T0, ttl_s=3600, used=["a"], max_models=2)) == ["b", "a"]


def start_and_finish(task: Task) -> int:
    task.refresh_from_db()
    gpu_id = Allocation.objects.get(task=task).gpu_id
    lifecycle.report_started(task.pk, node_id=task.node_id, actor="agent")
    lifecycle.report_finished(task.pk, node_id=task.node_id, exit_code=0, actor="agent")
    return gpu_id


def test_after_a_deepseek_task_ran_on_a_gpu_the_next_one_goes_there(acme, servers, settings):
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=1.0, batch_share=1.0)
    blocker = Task.objects.create(tenant=acme, name="blocker", command="x", gpu_memory_mb=10_000)
    run_pass()
    first = Task.objects.create(tenant=acme, name="infer", command="x", gpu_memory_mb=10_000,
                                model_name="deepseek-7b")
    run_pass()
    g = start_and_finish(first)
    start_and_finish(blocker)
    assert list(GPU.objects.get(pk=g).loaded_models) == ["deepseek-7b"]

    again = Task.objects.create(tenant=acme, name="infer-2", command="x", gpu_memory_mb=10_000,
                                model_name="deepseek-7b")
    other = Task.objects.create(tenant=acme, name="other", command="x", gpu_memory_mb=10_000,
                                model_name="llama-3-8b")
    run_pass()
    assert Allocation.objects.get(task=again).gpu_id == g
    # Without the model there, the same request shape goes by load balance alone: elsewhere.
    assert Allocation.objects.get(task=other).gpu_id != g


def test_an_agent_may_report_models_it_sees_loaded(enrolled):  # noqa: F811 - the fixture
    node, token = enrolled
    reports = [gpu_report(i, f"GPU-sim-01-{i}") for i in range(2)]
    reports[1]["loaded_models"] = ["qwen2-7b"]
    r = agent_client(token).post(f"{API}/heartbeat", {"name": "sim-01", "gpus": reports}, format="json")
    assert r.status_code == 200, r.json()
    assert GPU.objects.get(node=node, index=0).loaded_models == {}
    assert list(GPU.objects.get(node=node, index=1).loaded_models) == ["qwen2-7b"]


def test_a_report_of_models_on_several_gpus_is_remembered_in_one_write(enrolled, monkeypatch):  # noqa: F811
    from nodes import heartbeat

    node, token = enrolled
    calls: list[dict] = []
    remember = heartbeat.remember_models
    monkeypatch.setattr(heartbeat, "remember_models", lambda used: calls.append(dict(used)) or remember(used))
    reports = [gpu_report(i, f"GPU-sim-01-{i}") for i in range(3)]
    reports[0]["loaded_models"] = ["qwen2-7b"]
    reports[2]["loaded_models"] = ["deepseek-7b", "llama-3-8b"]
    r = agent_client(token).post(f"{API}/heartbeat", {"name": "sim-01", "gpus": reports}, format="json")
    assert r.status_code == 200, r.json()
    assert len(calls) == 1 and len(calls[0]) == 2
    models = {g.index: sorted(g.loaded_models) for g in GPU.objects.filter(node=node)}
    assert models == {0: ["qwen2-7b"], 1: [], 2: ["deepseek-7b", "llama-3-8b"]}
