"""Tasks cannot reach the agent's credentials or each other: a real agent started as
root, real Unix accounts (made with useradd, prefixed ``iso``), real processes."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model

from nodes.agent.accounts import AccountError, AccountPolicy
from nodes.enrolment import issue_join_token
from tenants.models import Membership
from tests.agent_live import ROOT, Agents, assign, server_ready, start_portal, stop, task_log, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching task accounts needs root (CI runs as root)")

# uids of at least 1000 (useradd's default range): eligible for the user and tenant mappings.
ACCOUNTS = ("isoalice", "isoglobex")


@pytest.fixture(scope="module")
def unix_accounts():
    for name in ACCOUNTS:
        subprocess.run(["userdel", name], capture_output=True)  # a crashed earlier run
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
                       check=True)
    try:
        yield {name: pwd.getpwnam(name) for name in ACCOUNTS}
    finally:
        for name in ACCOUNTS:
            subprocess.run(["userdel", name], check=False)


@pytest.fixture
def portal(tmp_path, channel_layer_on_test_db):
    url, proc = start_portal(tmp_path)
    yield url
    stop(proc)


@pytest.fixture
def agents(tmp_path, portal):
    token_file = tmp_path / "join-token"
    token_file.write_text(issue_join_token(note="tests"))
    fleet = Agents(tmp=tmp_path, join_token_file=token_file)
    yield fleet
    fleet.stop_all()


def finished(task, timeout: float = 20):
    wait_for(lambda: (task.refresh_from_db(), task.is_final)[1], timeout, f"task {task.pk} to finish")
    return task


def lines_with(log: str, prefix: str) -> list[str]:
    return [line[len(prefix):].strip() for line in log.splitlines() if line.startswith(prefix)]


@pytest.mark.django_db(transaction=True)
def test_tasks_run_as_their_mapped_accounts_and_reach_no_credential_and_no_other_tenant(
        agents, portal, acme, globex, unix_accounts, tmp_path):
    User = get_user_model()
    isoalice = User.objects.create_user("isoalice")  # a portal user with an account of the same name here
    Membership.objects.create(user=isoalice, tenant=acme)
    carol = User.objects.create_user("carol")  # no account here: her tenant's account runs her tasks
    Membership.objects.create(user=carol, tenant=globex)

    join_secret = issue_join_token(note="in the agent's environment")
    proc = agents.start("sim-01", [portal], "--tenant-account", "iso{tenant}",
                        env={"GPU_AGENT_JOIN_TOKEN": join_secret, "ISO_AGENT_ONLY": "agent-secret"})
    node = server_ready("sim-01")
    state = tmp_path / "agents" / "sim-01"
    join_file = tmp_path / "join-token-sim-01"
    assert (state / "node_token").exists()
    assert oct(os.stat(state).st_mode & 0o777) == "0o700"
    assert oct(os.stat(state / "node_token").st_mode & 0o777) == "0o600"
    assert not join_file.exists(), "the spent join token must leave the host"

    probe = (
        f"echo UID: $(id -u); "
        f"cat {state}/node_token 2>&1 | sed 's/^/NODE_TOKEN: /'; "
        f"ls {state} 2>&1 | sed 's/^/STATE_DIR: /'; "
        f"cat {state}/tasks/*/meta.json 2>&1 | sed 's/^/META: /'; "
        f"cat /proc/{proc.pid}/environ 2>&1 | tr '\\0' '\\n' | sed 's/^/AGENT_ENV: /'; "
        "grep NoNewPrivs /proc/self/status | sed 's/^/STATUS: /'; "
        "env | sed 's/^/ENV: /'; "
        "echo tenant-a-secret > mine.txt; echo WORKDIR: $(pwd)"
    )
    first = assign(node, acme, probe, [0], submitter=isoalice, env={"OWN_SETTING": "yes"})
    finished(first)
    log = task_log(first)
    assert first.status == "succeeded", log

    assert lines_with(log, "UID:") == [str(unix_accounts["isoalice"].pw_uid)]
    for prefix in ("NODE_TOKEN:", "STATE_DIR:", "META:", "AGENT_ENV:"):
        found = lines_with(log, prefix)
        assert len(found) == 1 and "Permission denied" in found[0], (prefix, found)
    assert lines_with(log, "STATUS:") == ["NoNewPrivs:\t1"]

    env = dict(line.split("=", 1) for line in lines_with(log, "ENV:") if "=" in line)
    assert env["OWN_SETTING"] == "yes" and env["TASK_ID"] == str(first.pk) and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["USER"] == "isoalice"
    assert "ISO_AGENT_ONLY" not in env and "GPU_AGENT_JOIN_TOKEN" not in env
    assert not [name for name in env if name.startswith(("PYTEST", "DJANGO", "DATABASE", "VIRTUAL_ENV"))]
    assert join_secret not in log

    work_dir = lines_with(log, "WORKDIR:")[0]
    assert work_dir == str(agents.work_dir(first))
    assert not work_dir.startswith(str(state))
    info = os.stat(work_dir)
    assert (info.st_uid, oct(info.st_mode & 0o777)) == (unix_accounts["isoalice"].pw_uid, "0o700")

    # Another tenant's task on the same server, under its tenant's account.
    snoop = (f"echo UID: $(id -u); cat {work_dir}/mine.txt 2>&1 | sed 's/^/READ: /'; "
             f"ls {agents.work_root} 2>&1 | sed 's/^/LIST: /'")
    second = assign(node, globex, snoop, [1], submitter=carol)
    finished(second)
    log = task_log(second)
    assert lines_with(log, "UID:") == [str(unix_accounts["isoglobex"].pw_uid)]
    assert "Permission denied" in lines_with(log, "READ:")[0]
    assert "Permission denied" in lines_with(log, "LIST:")[0]
    assert "tenant-a-secret" not in log


def test_the_account_mapping_never_picks_root_or_a_system_account(unix_accounts):
    policy = AccountPolicy(tenant_format="iso{tenant}", fallback="nobody", min_uid=1000)
    assert policy.resolve("isoalice", "acme").name == "isoalice"
    assert policy.resolve("carol", "globex").name == "isoglobex"
    # A portal user called root or daemon gets neither account.
    assert policy.resolve("root", "nope").name == "nobody"
    assert policy.resolve("daemon", "nope").name == "nobody"
    assert policy.resolve("bad\0name", "nope").name == "nobody"
    with pytest.raises(AccountError, match="no account"):
        AccountPolicy(tenant_format="", fallback="root").resolve("root", "acme")
    no_users = AccountPolicy(map_users=False, tenant_format="iso{tenant}")
    assert no_users.resolve("isoalice", "globex").name == "isoglobex"


def test_an_agent_refuses_to_start_tasks_where_it_cannot_switch_accounts(tmp_path):
    # Not root and no single-user setting: refused. Root with it: refused as well.
    assert "not root" in AccountPolicy().check_agent(1000)
    assert AccountPolicy(single_user_host=True).check_agent(1000) is None
    assert AccountPolicy().check_agent(0) is None
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "agent_guard.py"), "--portal", "http://127.0.0.1:9", "--simulate",
         "1xH100-80GB", "--state-dir", str(tmp_path / "state"), "--single-user-host"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--single-user-host" in lines[0] and "root" in lines[0]
