"""The shipped Prometheus rules and Grafana dashboard refer only to metrics that
/metrics really exposes (a renamed metric must not silently break an alert)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
PREFIXES = ("scheduler_", "gpu_", "node_", "tenant_", "portal_")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _exposed(client) -> set[str]:
    body = client.get("/metrics").content.decode()
    names = set()
    for family in text_string_to_metric_families(body):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def _referenced(expr: str) -> set[str]:
    return {m for m in re.findall(r"\b[a-z_]+\b", expr) if m.startswith(PREFIXES)}


def test_every_alert_rule_uses_exposed_metrics(client, servers, acme):
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"GPUServerLost", "GPUError", "SchedulerQueueWaitHigh"} <= names
    exposed = _exposed(client)
    for group in rules["groups"]:
        for rule in group["rules"]:
            missing = _referenced(rule["expr"]) - exposed
            assert not missing, (rule["alert"], missing)


def test_every_grafana_panel_uses_exposed_metrics(client, servers, acme):
    dashboard = json.loads((ROOT / "deploy/grafana/gpu-portal-dashboard.json").read_text())
    exposed = _exposed(client)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert not (_referenced(expr) - exposed), expr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_the_metrics(client, servers, acme, tmp_path):
    subprocess.run(["promtool", "check", "rules", str(ROOT / "deploy/prometheus/alerts.yml")], check=True)
    body = client.get("/metrics").content
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    # promtool lints style (e.g. counters without _total in help); errors would be "error" lines.
    assert b"error" not in result.stderr.lower(), result.stderr
