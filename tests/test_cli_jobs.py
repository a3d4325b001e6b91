"""gpuctl for the job model labs use, as a subprocess against a live portal: batch scripts with
#GPUCTL directives, gangs, dependencies and arrays, and a queue that folds arrays."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess

import pytest

from scheduling.models import Task, TaskLogChunk
from tests.test_cli import gpuctl  # noqa: F401 - the fixture

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_batch_script_carries_its_options_and_the_command_line_overrides_them(gpuctl, tmp_path):  # noqa: F811
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/bash\n"
                      "#GPUCTL --nodes 2 --gpus-per-node 8\n"
                      "#GPUCTL --priority low --env EPOCHS=3\n"
                      "# an ordinary comment\n"
                      "\n"
                      "torchrun --nnodes $NNODES --node_rank $NODE_RANK train.py \"$@\"\n"
                      "#GPUCTL --gpus 1  (after the first command: not a directive)\n")
    out = gpuctl("submit", "--priority", "high", "--env", "SEED=1", str(script), "--lr", "0.1").stdout
    task = Task.objects.get(pk=int(out.strip()))
    assert (task.gpu_count, task.nodes, task.priority, task.name) == (16, 2, 2, "train.sh")
    assert task.env == {"EPOCHS": "3", "SEED": "1"}
    # The script itself is the command, run by its #! interpreter with its arguments.
    words = shlex.split(task.command)
    assert words[:2] == ["/bin/bash", "-c"] and words[2] == script.read_text() and words[3:] == [
        "train.sh", "--lr", "0.1"]
    result = subprocess.run(["/bin/bash", "-c", "echo ran \"$0\" \"$@\"", *words[3:]], capture_output=True,
                            text=True, check=True)
    assert result.stdout == "ran train.sh --lr 0.1\n"
    shown = gpuctl("show", str(task.pk)).stdout
    assert "nodes:           2" in shown and "gpus_per_node:   8" in shown
    TaskLogChunk.objects.create(task=task, attempt=0, rank=0, offset=0, data="rank zero\n")
    TaskLogChunk.objects.create(task=task, attempt=0, rank=1, offset=0, data="rank one\n")
    assert gpuctl("logs", str(task.pk)).stdout == "rank zero\n"
    assert gpuctl("logs", "--rank", "1", str(task.pk)).stdout == "rank one\n"
    refused = gpuctl("logs", "--rank", "2", str(task.pk), check=False)
    assert refused.returncode == 1 and "rank: Must be between 0 and 1." in refused.stderr


def test_a_bad_directive_is_one_line_naming_the_script(gpuctl, tmp_path):  # noqa: F811
    script = tmp_path / "bad.sh"
    script.write_text("#!/bin/sh\n#GPUCTL --nodes two\necho hi\n")
    proc = gpuctl("submit", str(script), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"gpuctl: error: {script}: bad #GPUCTL option: argument --nodes: invalid int value: 'two'"]
    proc = gpuctl("submit", "--nodes", "3", "--gpus-per-node", "8", "--", "torchrun", "x.py", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "gpuctl: error: nodes: Must be between 1 and 2 (the servers registered)."
    assert not Task.objects.exists()


def test_dependencies_and_arrays_through_the_cli_and_a_folded_queue(gpuctl, settings):  # noqa: F811
    settings.SCHEDULER = dataclasses.replace(settings.SCHEDULER, online_share=1.0, batch_share=1.0)
    first = int(gpuctl("submit", "--name", "prep", "--", "python", "prep.py").stdout)
    out = gpuctl("submit", "--name", "sweep", "--array", "0-9%2", "--dependency", f"afterok:{first}",
                 "--", "python", "sweep.py").stdout
    assert out.startswith("array ")
    array_id = int(out.split()[1])
    elements = Task.objects.filter(array_id=array_id)
    assert elements.count() == 10
    assert {tuple(t.dependencies.values_list("kind", "depends_on_id")) for t in elements} == {
        (("after_ok", first),)}
    Task.objects.filter(array_id=array_id).update(pending_reason=f"waiting for task #{first} to succeed")
    queue = gpuctl("queue").stdout.splitlines()
    assert len(queue) == 3  # header, prep, the array folded onto one line
    folded = next(line for line in queue if line.startswith(f"{array_id}[]"))
    assert "10 pending" in folded and f"waiting for task #{first} to succeed" in folded
    shown = gpuctl("show", "--array", str(array_id)).stdout
    assert "spec:            0-9%2" in shown and "counts:          pending: 10" not in shown
    assert "10 pending" in shown
    assert gpuctl("cancel", "--array", str(array_id)).stdout.strip() == f"array {array_id}: 10 cancelled"
    assert json.loads(gpuctl("queue", "--json").stdout)[0]["id"] == first
    proc = gpuctl("submit", "--dependency", "afterok:999999", "--", "x", check=False)
    assert proc.returncode == 1 and "dependency: Unknown task #999999" in proc.stderr



def test_a_folded_queue_reads_in_chinese(monkeypatch):
    from cli import gpuctl as cli

    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    tasks = [{"id": i, "name": "sweep", "tenant": "acme", "status": status, "priority": "normal", "gpu_count": 1,
              "nodes": 1, "queue_position": None, "pending_reason": "", "server": "", "failure_reason": "",
              "array_id": 7 if i < 4 else None} for i, status in [(1, "running"), (2, "pending"), (3, "pending"),
                                                                 (4, "timed_out")]]
    rows = cli.fold_arrays(tasks)
    assert [row[3] for row in rows] == ["2 等待中,1 运行中", "超时"]
