"""One name for a GPU's state, whoever asks: the API, the admin's GPU list and the live grid."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from nodes.gpu_state import GPUState
from nodes.models import GPU, GPUHealth, NodeStatus
from portal import livedata
from scheduling.choices import TaskStatus
from scheduling.models import Allocation, Task
from tests.conftest import make_server

pytestmark = pytest.mark.django_db


@pytest.fixture
def every_state(acme, servers) -> dict[str, GPUState]:
    """One GPU in each state, and the GPUs where two conditions meet (the precedence)."""
    node = servers[0]
    gpus = {g.index: g for g in node.gpus.all()}

    def hold(index: int) -> None:
        task = Task.objects.create(tenant=acme, name=f"t{index}", command="x", status=TaskStatus.RUNNING, node=node)
        Allocation.objects.create(task=task, gpu=gpus[index], node=node, memory_mb=10_000)

    hold(1)
    gpus[2].cordon("ECC errors")
    gpus[3].reserved = True
    gpus[3].save(update_fields=["reserved"])
    gpus[4].health = GPUHealth.ERROR
    gpus[4].save(update_fields=["health"])
    hold(5)  # reserved after its task was placed: reserved comes first
    gpus[5].reserved = True
    gpus[5].save(update_fields=["reserved"])
    hold(6)  # cordoned while a task holds it
    gpus[6].cordon("hot")
    draining = make_server("gpu-03", gpus=1, status=NodeStatus.DRAINING)
    hold_draining = Task.objects.create(tenant=acme, name="d", command="x", status=TaskStatus.RUNNING, node=draining)
    Allocation.objects.create(task=hold_draining, gpu=draining.gpus.get(), node=draining, memory_mb=10_000)
    return {
        "gpu-01:0": GPUState.FREE, "gpu-01:1": GPUState.ALLOCATED, "gpu-01:2": GPUState.CORDONED,
        "gpu-01:3": GPUState.RESERVED, "gpu-01:4": GPUState.ERROR, "gpu-01:5": GPUState.RESERVED,
        "gpu-01:6": GPUState.CORDONED, "gpu-03:0": GPUState.UNAVAILABLE,
    }


def test_the_api_and_the_live_grid_name_each_gpu_alike(api_client_for, alice, every_state):
    api = {f"{g['server']}:{g['index']}": g["state"] for g in api_client_for(alice).get("/api/v1/gpus").json()}
    grid = {f"{g['node']}:{g['index']}": g["state"] for g in livedata.gpu_rows()}
    for name, state in every_state.items():
        assert (api[name], grid[name]) == (state, state), name
    assert set(api.values()) <= set(GPUState.values) and set(grid.values()) <= set(GPUState.values)


def test_the_admin_gpu_list_uses_the_same_names(client, staff, every_state, servers):
    client.force_login(staff)
    page = client.get(reverse("admin:nodes_gpu_changelist")).content.decode()
    cells = dict(re.findall(r'data-gpu="(\d+)" data-field="state" class="gpu-state state-(\w+)"', page))
    named = {f"{g.node.name}:{g.index}": cells[str(g.pk)] for g in GPU.objects.select_related("node")
             if f"{g.node.name}:{g.index}" in every_state}
    assert named == {name: str(state) for name, state in every_state.items()}


def test_the_cluster_totals_count_by_the_same_names(api_client_for, alice, every_state):
    totals = api_client_for(alice).get("/api/v1/cluster").json()["gpus"]
    assert {k: totals[k] for k in GPUState.values} == {
        "free": 2 + 8, "allocated": 1, "cordoned": 2, "reserved": 2, "error": 1, "unavailable": 1}
