"""Helper process for tests/test_pass_concurrency.py: runs scheduling passes against
the database in DATABASE_URL, and between passes finishes some of the tasks it
finds assigned (as agents would), so that GPUs keep freeing up.

    python tests/pass_worker.py NAME PASSES [--hang-mid-pass]

With --hang-mid-pass the second pass stops after writing its allocations, before
committing, prints MIDPASS and waits to be killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django

django.setup()

from scheduling import lifecycle, passes  # noqa: E402
from scheduling.choices import TaskStatus  # noqa: E402
from scheduling.models import Task  # noqa: E402


def hang_after_apply(original):
    def apply(*args, **kwargs):
        original(*args, **kwargs)
        print("MIDPASS", flush=True)
        time.sleep(3600)

    return apply


def finish_some(name: str, count: int) -> int:
    finished = 0
    for task_id, node_id in (Task.objects.filter(status=TaskStatus.ASSIGNED).order_by("?")
                             .values_list("pk", "node_id")[:count]):
        try:
            lifecycle.report_started(task_id, node_id=node_id, actor=f"agent:{name}")
            lifecycle.report_finished(task_id, node_id=node_id, exit_code=0, actor=f"agent:{name}")
            finished += 1
        except PermissionError:
            pass  # another worker requeued or finished it first
    return finished


def main() -> None:
    name, count = sys.argv[1], int(sys.argv[2])
    hang = "--hang-mid-pass" in sys.argv
    for i in range(count):
        if hang and i == 1:
            passes._apply = hang_after_apply(passes._apply)
        result = passes.run_pass(actor=f"scheduler:{name}")
        print(f"{name} pass {i}: {result}", flush=True)
        finish_some(name, 40)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
