"""Settings and the YAML file: defaults from the seeds, readable errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from portal.config import ConfigError, SchedulerConfig, build_config, load_config
from portal.env import envbool, envint, envsecret
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_defaults_are_the_seeds_defaults():
    c = SchedulerConfig()
    assert (c.poll_interval_ms, c.memory_safety_margin_mb, c.max_models_per_gpu) == (100, 2000, 2)
    assert (c.heartbeat_interval_s, c.heartbeat_timeout_s) == (10, 30)
    assert (c.default_task_timeout_s, c.max_task_timeout_s) == (3600, 86400)
    assert (c.online_share, c.batch_share, c.reserved_gpus, c.strategy) == (0.7, 0.3, (), "binpack")


def test_the_shipped_example_file_loads_and_equals_the_defaults():
    assert load_config(str(ROOT / "configs" / "portal.yaml")) == SchedulerConfig()


def test_a_yaml_file_overrides_the_defaults(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("scheduler:\n  strategy: spread\n  reserved_gpus: [gpu-01:0]\n  preemption: [critical]\n")
    c = load_config(str(f))
    assert (c.strategy, c.reserved_gpus, c.preemption) == ("spread", ("gpu-01:0",), ("CRITICAL",))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"scheduler": {"poll_intervall_ms": 5}}, "unknown key scheduler.poll_intervall_ms"),
        ({"schedular": {}}, "unknown top-level key 'schedular'"),
        ({"scheduler": {"strategy": "random"}}, "scheduler.strategy must be one of binpack, spread"),
        ({"scheduler": {"memory_safety_margin_mb": -1}}, "scheduler.memory_safety_margin_mb must be between"),
        ({"scheduler": {"poll_interval_ms": "fast"}}, "scheduler.poll_interval_ms must be an integer"),
        ({"scheduler": {"online_share": 0.8, "batch_share": 0.3}}, "must not exceed 1"),
        ({"scheduler": {"heartbeat_timeout_s": 5}}, "heartbeat_timeout_s must be greater"),
        ({"scheduler": {"preemption": ["LOW"]}}, "scheduler.preemption may list"),
        ({"scheduler": {"allow_borrowing": "yes"}}, "scheduler.allow_borrowing must be true or false"),
    ],
)
def test_a_bad_value_or_unknown_key_is_named_in_one_line(doc, message):
    with pytest.raises(ConfigError) as err:
        build_config(doc)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("scheduler:\n  strategy: [binpack\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d"):
        load_config(str(f))


def test_env_helpers_fail_loudly_naming_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("SOME_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="SOME_FLAG must be a boolean"):
        envbool("SOME_FLAG")
    monkeypatch.setenv("SOME_INT", "12x")
    with pytest.raises(ImproperlyConfigured, match="SOME_INT must be an integer"):
        envint("SOME_INT", 1)
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    monkeypatch.setenv("SOME_SECRET_FILE", str(secret))
    assert envsecret("SOME_SECRET") == "s3cr3t"


def test_manage_py_exits_with_one_readable_line_on_a_bad_config(tmp_path, db):
    f = tmp_path / "portal.yaml"
    f.write_text("scheduler:\n  max_models_per_gpu: lots\n")
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=subprocess_env(PORTAL_CONFIG=str(f)),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"configuration error: PORTAL_CONFIG={f}: scheduler.max_models_per_gpu must be an integer, got 'lots'"
    ]


def test_manage_py_names_a_bad_environment_variable(db):
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=subprocess_env(DEBUG="perhaps"),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "configuration error: DEBUG must be a boolean (true/false/1/0), got 'perhaps'"


def test_check_deploy_is_clean_with_the_documented_production_variables(db):
    proc = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
        capture_output=True, text=True, timeout=60,
        env=subprocess_env(
            PORTAL_PRODUCTION="true", SECRET_KEY="x" * 20 + "a-long-random-production-secret-key-0123456789",
            ALLOWED_HOSTS="gpu.example.org", SECURE_SSL_REDIRECT="true", SECURE_COOKIES="true",
            SECURE_HSTS_SECONDS="31536000", SECURE_HSTS_PRELOAD="true", BEHIND_TLS_PROXY="true",
        ),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no issues" in proc.stdout


def test_production_refuses_to_start_without_a_secret_key(db):
    env = subprocess_env(PORTAL_PRODUCTION="true")
    env.pop("SECRET_KEY", None)
    proc = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2
    assert "SECRET_KEY (or SECRET_KEY_FILE) must be set" in proc.stderr


def test_portal_connections_bound_lock_waits_and_skip_jit_compilation(db):
    """The connection options of portal/settings.py reach the server: a 30 s lock wait at most,
    and no JIT compilation (it was most of the time of the usage reports over a year's history)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('lock_timeout'), current_setting('jit')")
        assert cursor.fetchone() == ("30s", "off")
