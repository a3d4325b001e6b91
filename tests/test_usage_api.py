"""GET /api/v1/usage (JSON and CSV, scoping, bad input) and gpuctl usage against a live server."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from portal.api.authentication import create_token
from scheduling.usage import refresh_fair_share
from tests.usage_history import make_history

ROOT = Path(__file__).resolve().parent.parent
OCTOBER = {"from": "2026-10-01", "to": "2026-11-01"}


@pytest.fixture
def history(acme, globex, alice, bob, carol):
    return make_history(acme, globex, alice, bob, carol)


def hours(body: dict, key: str) -> dict:
    return {r[key]: r["gpu_hours"] for r in body["rows"]}


@pytest.mark.django_db
def test_staff_see_every_tenant_and_user(history, staff, api_client_for):
    client = api_client_for(staff)
    body = client.get("/api/v1/usage", {**OCTOBER, "group_by": "tenant"}).json()
    assert body["group_by"] == ["tenant"]
    assert hours(body, "tenant") == {"acme": 7.5, "globex": 4.0}
    body = client.get("/api/v1/usage", {**OCTOBER, "group_by": "tenant,user,gpu_model"}).json()
    assert {(r["tenant"], r["user"], r["gpu_model"]): r["gpu_hours"] for r in body["rows"]} == {
        ("acme", "alice", "NVIDIA A100 80GB"): 6.5, ("acme", "bob", "NVIDIA A100 80GB"): 1.0,
        ("globex", "carol", "NVIDIA A100 80GB"): 4.0,
    }
    assert body["rows"][0]["gpu_memory_gb_hours"] > 0


@pytest.mark.django_db
def test_a_tenant_admin_sees_every_member_a_plain_member_only_themselves(history, alice, bob, api_client_for):
    # alice is acme's admin, bob a plain member; neither sees globex.
    as_alice = api_client_for(alice).get("/api/v1/usage", {**OCTOBER, "group_by": "user"}).json()
    assert hours(as_alice, "user") == {"alice": 6.5, "bob": 1.0}
    as_bob = api_client_for(bob).get("/api/v1/usage", {**OCTOBER, "group_by": "user"}).json()
    assert hours(as_bob, "user") == {"bob": 1.0}
    # ...but the tenant's total is no secret to its members.
    totals = api_client_for(bob).get("/api/v1/usage", {**OCTOBER, "group_by": "tenant"}).json()
    assert hours(totals, "tenant") == {"acme": 7.5}


@pytest.mark.django_db
def test_csv_has_a_header_and_one_line_per_group(history, staff, api_client_for):
    response = api_client_for(staff).get("/api/v1/usage", {**OCTOBER, "group_by": "tenant", "format": "csv"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0] == ["tenant", "gpu_hours", "gpu_memory_gb_hours", "utilization_pct"]
    assert [(r[0], float(r[1])) for r in rows[1:]] == [("acme", 7.5), ("globex", 4.0)]


@pytest.mark.django_db
@pytest.mark.parametrize(("params", "field"), [
    ({"from": "yesterday"}, "from"),
    ({"to": "2026-13-45"}, "to"),
    ({"from": "2026-10-02", "to": "2026-10-01"}, "to"),
    ({"from": "2020-01-01", "to": "2026-01-01"}, "to"),
    ({"group_by": "tenant,colour"}, "group_by"),
    ({"format": "xml"}, "format"),
])
def test_bad_parameters_get_400_with_the_field(params, field, staff, api_client_for):
    response = api_client_for(staff).get("/api/v1/usage", params)
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.django_db
def test_anonymous_callers_are_refused(client):
    assert client.get("/api/v1/usage").status_code in (401, 403)


@pytest.mark.django_db(transaction=True)
def test_gpuctl_usage_prints_an_sreport_like_table_and_csv(live_daphne, history, alice, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GPUCTL_URL", "GPUCTL_TOKEN")}
    env.update(GPUCTL_CONFIG=str(tmp_path / "gpuctl.json"), GPUCTL_URL=live_daphne,
               GPUCTL_TOKEN=create_token(alice, "cli")[1])

    def gpuctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.gpuctl", "usage", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    out = gpuctl("--from", "2026-10-01", "--to", "2026-11-01")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("GPU usage 2026-10-01")
    assert lines[2].split() == ["TENANT", "USER", "GPU-HOURS", "GPU-MEM", "GB-H", "UTIL"]
    assert lines[3].split()[:3] == ["acme", "alice", "6.50"]
    assert lines[4].split()[:3] == ["acme", "bob", "1.00"]
    assert lines[-1] == "total: 7.50 GPU-hours"

    as_csv = gpuctl("--from", "2026-10-01", "--to", "2026-11-01", "--group-by", "gpu_model", "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    assert list(csv.reader(io.StringIO(as_csv.stdout)))[1][:2] == ["NVIDIA A100 80GB", "7.5"]

    as_json = json.loads(gpuctl("--from", "2026-10-01", "--to", "2026-11-01", "--json").stdout)
    assert as_json["rows"][0]["user"] == "alice"

    # The fair-share factor beside the quota (acme used all of the recent usage: below 1).
    refresh_fair_share()
    quota = subprocess.run([sys.executable, "-m", "cli.gpuctl", "quota"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
    header, acme_line = quota.stdout.splitlines()[:2]
    assert header.split()[-2:] == ["FAIR", "SHARE"]
    assert acme_line.split()[0] == "acme" and float(acme_line.split()[-1]) < 1.0

    bad = gpuctl("--from", "someday")
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("gpuctl: error: from:")
    assert len(bad.stderr.strip().splitlines()) == 1
