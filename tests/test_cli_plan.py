"""gpuctl reserve / reservations / grant-request as real subprocesses against a live daphne."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from portal.api.authentication import create_token
from scheduling.models import Reservation
from tenants.models import QuotaGrant

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpuctl(live_daphne, alice, servers, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GPUCTL_URL", "GPUCTL_TOKEN")}
    env.update(GPUCTL_CONFIG=str(tmp_path / "config.json"), GPUCTL_URL=live_daphne,
               GPUCTL_TOKEN=create_token(alice, "cli")[1])

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.gpuctl", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)

    return run


def test_reserve_list_and_grant_request_through_the_cli(gpuctl, staff):
    start = (timezone.now() + timedelta(days=2)).replace(second=0, microsecond=0)
    end = start + timedelta(days=3)
    when = ("--start", start.strftime("%Y-%m-%d %H:%M"), "--end", end.strftime("%Y-%m-%d %H:%M"))
    out = gpuctl("reserve", "paper-deadline", "--gpus", "8", "--server", "gpu-01", "--reason", "NeurIPS", *when)
    assert out.returncode == 0, out.stderr
    res = Reservation.objects.get()
    assert out.stdout.strip() == f"reservation paper-deadline (#{res.pk}) requested"
    assert (res.gpu_count, res.starts_at, res.ends_at) == (8, start, end)

    listed = gpuctl("reservations").stdout.splitlines()
    assert listed[0].split() == ["ID", "NAME", "TENANT", "GPUS", "START", "END", "WEEKLY", "STATUS"]
    assert listed[1].split()[:4] == [str(res.pk), "paper-deadline", "acme", "8"] and listed[1].endswith("requested")
    assert [r["name"] for r in json.loads(gpuctl("reservations", "--json").stdout)] == ["paper-deadline"]

    # A conflicting request: one readable line, non-zero exit, nothing written.
    from scheduling import reservations

    reservations.decide(res.pk, approve=True, by=staff)
    clash = gpuctl("reserve", "clash", "--gpus", "1", "--server", "gpu-01", *when)
    assert clash.returncode == 1 and len(clash.stderr.strip().splitlines()) == 1
    assert "conflict: only 0 of the 8 matching GPUs are free" in clash.stderr
    assert Reservation.objects.count() == 1

    out = gpuctl("grant-request", "--gpus", "4", "--reason", "new student", *when)
    assert out.returncode == 0, out.stderr
    grant = QuotaGrant.objects.get()
    assert out.stdout.strip() == f"quota grant #{grant.pk} for acme requested: +4 GPUs"
    bad = gpuctl("grant-request", "--reason", "nothing", *when)
    assert bad.returncode == 1 and "Ask for at least one extra" in bad.stderr
    assert gpuctl("reserve", "x", "--gpus", "1", "--start", "soon", "--end", "later").returncode == 2
