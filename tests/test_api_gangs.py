"""Submitting gangs across servers through the API: the same limits and messages as the portal form."""

from __future__ import annotations

import dataclasses

import pytest

from scheduling.models import Task
from scheduling.passes import run_pass
from scheduling.quotas import usage_of

pytestmark = pytest.mark.django_db


@pytest.fixture
def as_alice(api_client_for, alice, servers):
    return api_client_for(alice)


def submit(client, **fields):
    return client.post("/api/v1/tasks", {"command": "torchrun train.py", **fields}, format="json")


@pytest.mark.parametrize("fields", [
    {"nodes": 2, "gpus_per_node": 8},
    {"gpu_count": 16},  # a multiple of the largest server: whole servers, nodes inferred
    {"gpu_count": 16, "nodes": 2},
    {"gpus_per_node": 8, "gpu_count": 16},
])
def test_a_gang_may_be_asked_for_by_any_two_of_its_sizes(as_alice, fields):
    r = submit(as_alice, **fields)
    assert r.status_code == 201, r.content
    body = r.json()
    assert (body["gpu_count"], body["nodes"], body["gpus_per_node"]) == (16, 2, 8)


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"gpu_count": 12}, "gpu_count", "a multiple of 8 up to 16"),
    ({"gpu_count": 24}, "gpu_count", "a multiple of 8 up to 16"),
    ({"nodes": 3, "gpus_per_node": 8}, "nodes", "between 1 and 2 (the servers registered)"),
    ({"nodes": 2, "gpus_per_node": 9}, "gpus_per_node", "between 1 and 8"),
    ({"nodes": 2, "gpu_count": 9}, "gpu_count", "multiple of nodes (2)"),
    ({"nodes": 2, "gpus_per_node": 4, "gpu_count": 16}, "gpu_count", "nodes x gpus_per_node (8)"),
    ({"nodes": 2}, "gpus_per_node", "Required with nodes"),
    ({"nodes": "two"}, "nodes", "whole number"),
    ({"topology_key": "rack"}, "topology_key", "several servers"),
    ({"nodes": 2, "gpus_per_node": 8, "share_mode": "shared", "gpu_memory_mb": 1000}, "share_mode", "exclusive"),
])
def test_a_bad_gang_gets_a_field_message_and_creates_nothing(as_alice, fields, field, words):
    r = submit(as_alice, **fields)
    assert r.status_code == 400
    assert words in " ".join(r.json()[field]), r.json()
    assert not Task.objects.exists()


def test_a_placed_gang_shows_its_ranks_and_holds_every_gpu_against_the_quota(as_alice, acme, settings):
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=1.0, batch_share=1.0)
    acme.quota.max_gpus, acme.quota.max_gpu_memory_mb = 16, 10**7
    acme.quota.save()
    task_id = submit(as_alice, nodes=2, gpus_per_node=8, topology_key="rack").json()["id"]
    run_pass()
    # The servers carry no rack label: the gang can never be placed, and says so.
    body = as_alice.get(f"/api/v1/tasks/{task_id}").json()
    assert body["status"] == "pending"
    assert body["pending_reason"].startswith("no 2 servers with 8 GPUs")
    assert "sharing rack" in body["pending_reason"]

    task_id = submit(as_alice, gpu_count=16).json()["id"]
    run_pass()
    body = as_alice.get(f"/api/v1/tasks/{task_id}").json()
    assert body["status"] == "assigned", body["pending_reason"]
    assert [r["rank"] for r in body["ranks"]] == [0, 1]
    assert sorted(r["server"] for r in body["ranks"]) == ["gpu-01", "gpu-02"]
    assert len(body["gpus"]) == 16
    usage = usage_of([acme.pk])[acme.pk]
    assert (usage.gpus, usage.running_tasks) == (16, 1)  # every GPU of the gang, one task


def test_a_dry_run_says_which_servers_a_gang_would_start_on(as_alice, acme, settings):
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=1.0, batch_share=1.0)
    acme.quota.max_gpus, acme.quota.max_gpu_memory_mb = 16, 10**7
    acme.quota.save()
    r = as_alice.post("/api/v1/tasks/preview", {"command": "x", "nodes": 2, "gpus_per_node": 8}, format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["fits"] and body["message"].startswith("Would start now as a gang on gpu-0")
    assert len(body["gpus"]) == 16 and not Task.objects.exists()
