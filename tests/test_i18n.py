"""English and Chinese: every user-visible string has a translation, pages follow the
browser's language or the switch, API errors and pending reasons read in Chinese."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import polib
import pytest
from django.utils import translation

from scheduling.models import Task
from scheduling.reasons import translate_reason

ROOT = Path(__file__).resolve().parent.parent
CATALOGUES = ROOT / "locale" / "zh_Hans" / "LC_MESSAGES"
PO = CATALOGUES / "django.po"
IGNORE = ["--ignore=.venv", "--ignore=var", "--ignore=tests", "--ignore=bench", "--ignore=staticfiles", "--ignore=cli",
          "--ignore=examples", "--ignore=portal/static/vendor/*"]
ZH = {"HTTP_ACCEPT_LANGUAGE": "zh-CN,zh;q=0.9,en;q=0.5"}


@pytest.mark.parametrize("domain", ["django", "djangojs"])
def test_every_committed_message_has_a_chinese_translation(domain):
    po = polib.pofile(str(CATALOGUES / f"{domain}.po"))
    assert len(po) > (200 if domain == "django" else 10)
    assert [e.msgid for e in po if not _translated(e) or "fuzzy" in e.flags] == []
    # Placeholders survive translation (a missing %(name)s would raise at display time).
    bad = [e.msgid for e in po if any(sorted(_placeholders(e.msgid)) != sorted(_placeholders(text))
                                      for text in ([e.msgstr] if not e.msgid_plural else e.msgstr_plural.values()))]
    assert bad == []


def _translated(entry: polib.POEntry) -> bool:
    """A msgstr, or (a plural message) every msgstr[n]."""
    if entry.msgid_plural:
        return bool(entry.msgstr_plural) and all(entry.msgstr_plural.values())
    return bool(entry.msgstr)


def _placeholders(text: str) -> list[str]:
    import re

    return re.findall(r"%\(\w+\)[sdr]|\{\{ ?\w+ ?\}\}", text)


@pytest.mark.skipif(not shutil.which("xgettext"), reason="gettext not installed: apt-get install -y gettext (.ci/run)")
def test_no_user_visible_string_in_the_code_lacks_a_translation(tmp_path):
    """Extract the marked strings afresh (Django's makemessages) into a copy of the catalogue:
    a string wrapped for translation but not translated shows up empty there. makemessages
    writes into every ``locale`` directory above the files it reads, so it runs in a copy of
    the source, never touching the checkout's catalogue."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "tests", "bench", "staticfiles", "__pycache__", "*.mo", ".import_linter_cache"))
    env = {k: v for k, v in __import__("os").environ.items() if k != "LOCALE_DIR"}
    untranslated = []
    for domain in ("django", "djangojs"):
        subprocess.run([sys.executable, "manage.py", "makemessages", "-l", "zh_Hans", "-d", domain, "--no-obsolete",
                        "--no-location", *IGNORE], cwd=src, env=env, check=True, capture_output=True, timeout=300)
        fresh = polib.pofile(str(src / "locale" / "zh_Hans" / "LC_MESSAGES" / f"{domain}.po"))
        untranslated += [f"{domain}: {e.msgid}" for e in fresh
                         if not e.obsolete and (not _translated(e) or "fuzzy" in e.flags)]
    assert untranslated == [], "translate these in locale/zh_Hans/LC_MESSAGES/"


@pytest.mark.django_db
def test_the_portal_follows_the_browsers_language_and_the_switch(client, alice, servers):
    client.force_login(alice)
    english = client.get("/").content.decode()
    assert "My running and pending tasks" in english and 'lang="en"' in english
    chinese = client.get("/", **ZH).content.decode()
    assert "我的运行中和排队任务" in chinese and 'lang="zh-hans"' in chinese and "GPU 门户" in chinese
    # The switch (on every page) wins over the browser's language.
    client.post("/i18n/setlang/", {"language": "en", "next": "/"}, **ZH)
    assert "My running and pending tasks" in client.get("/", **ZH).content.decode()


@pytest.mark.django_db
def test_the_admin_reads_in_chinese(client, staff, servers):
    client.force_login(staff)
    page = client.get("/admin/", **ZH).content.decode()
    assert "GPU 服务器" in page and "实时控制台" in page and "集群总览" in page
    grid = client.get("/admin/cluster/", **ZH).content.decode()
    assert "台服务器" in grid and "<small>空闲</small>" in grid and ">在线</span></h3>" in grid  # cells and servers
    assert "<h2>控制平面</h2>" in grid and "调度锁（来自 pg_locks）" in grid  # the control-plane panel
    catalogue = client.get("/jsi18n/", **ZH).content.decode()  # what live.js redraws the grid with
    assert "空闲" in catalogue or r"\u7a7a\u95f2" in catalogue  # JSON may escape it
    gpus = client.get("/admin/nodes/gpu/", **ZH).content.decode()
    assert "隔离：不再接收新任务" in gpus  # an action


@pytest.mark.django_db
def test_api_errors_read_in_chinese_when_asked(api_client_for, alice, servers):
    api = api_client_for(alice)
    r = api.post("/api/v1/tasks", {"command": "x", "gpu_count": 99}, format="json", **ZH)
    assert r.status_code == 400
    assert r.json()["gpu_count"] == [("必须在 1 到 8 之间（单台服务器最多的 GPU 数），或是 8 的倍数、最多 16，"
        "以占用整台服务器（或给出 nodes 和 gpus_per_node）。")]
    r = api.post("/api/v1/tasks", {"command": "x", "gpu_count": 99}, format="json")
    assert r.json()["gpu_count"] == ["Must be between 1 and 8 (the most GPUs any one server has), or a multiple of 8 "
                                     "up to 16 to span whole servers (or give nodes and gpus_per_node)."]


def test_pending_reasons_are_translated_from_the_cores_templates_at_display_time():
    with translation.override("zh-hans"):
        assert translate_reason("tenant acme at its GPU quota (8/8)") == "租户 acme 已达 GPU 配额（8/8）"
        assert translate_reason("requeued: CUDA out of memory; retrying with 24000 MB per GPU") == (
            "已重新排队：CUDA 显存不足；以每块 GPU 24000 MB 重试")
        assert translate_reason("waiting behind 3 higher-priority tasks") == "排在 3 个更高优先级任务之后"
        # A part no template knows is shown as written, never dropped.
        assert translate_reason("tenant acme at its GPU quota (8/8); something new") == (
            "租户 acme 已达 GPU 配额（8/8）；something new")
    with translation.override("en"):
        assert translate_reason("tenant acme at its GPU quota (8/8)") == "tenant acme at its GPU quota (8/8)"


@pytest.mark.django_db
def test_the_task_page_shows_the_pending_reason_in_chinese(client, alice, acme):
    task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="x",
                               pending_reason="tenant acme at its GPU quota (8/8)", queue_position=1)
    client.force_login(alice)
    page = client.get(f"/tasks/{task.pk}/", **ZH).content.decode()
    assert "租户 acme 已达 GPU 配额（8/8）" in page and "等待原因" in page


def test_every_gpuctl_message_has_a_chinese_translation():
    import re

    from cli import gpuctl

    source = (ROOT / "cli" / "gpuctl.py").read_text()
    wrapped = set(re.findall(r"""\b_\(\s*(["'])(.+?)\1""", source))
    blocks = re.findall(r"_\(h\) for h in \[([^\]]+)\]", source)
    headers = {h for block in blocks for h in re.findall(r'"([^"]+)"', block)}
    messages = {m for _q, m in wrapped} | headers
    assert len(messages) > 20
    assert sorted(messages - set(gpuctl.ZH_HANS)) == []


@pytest.mark.django_db
def test_the_api_and_gpuctl_read_pending_reasons_in_the_callers_language(api_client_for, alice, acme):
    task = Task.objects.create(tenant=acme, submitter=alice, name="t", command="x",
                               pending_reason="tenant acme at its GPU quota (8/8)")
    api = api_client_for(alice)
    assert api.get(f"/api/v1/tasks/{task.pk}", **ZH).json()["pending_reason"] == "租户 acme 已达 GPU 配额（8/8）"
    assert api.get(f"/api/v1/tasks/{task.pk}").json()["pending_reason"] == "tenant acme at its GPU quota (8/8)"


def test_live_frames_carry_reasons_and_states_in_the_viewers_language():
    from portal.consumers import localised, viewer_language

    scope = {"headers": [(b"accept-language", b"zh-CN,zh;q=0.9")], "cookies": {}}
    assert viewer_language(scope) == "zh-hans"
    assert viewer_language({"headers": [], "cookies": {"django_language": "en"}}) == "en"
    row = {"status": "pending", "status_label": "pending", "pending_reason": "waiting behind 2 higher-priority tasks",
           "failure_reason": ""}
    (zh,) = localised([row], "zh-hans")
    assert (zh["status_label"], zh["pending_reason"]) == ("等待中", "排在 2 个更高优先级任务之后")
    assert localised([row], "en") == [row]


def test_the_reasons_of_reservations_gangs_dependencies_and_arrays_read_in_chinese():
    with translation.override("zh-hans"):
        assert translate_reason("no 2 servers with 8 free GPUs sharing rack; best has 1") == (
            "没有 2 台各有 8 块空闲 GPU 的服务器，且 rack 相同；最多只有 1 台这样的服务器")
        assert translate_reason("can never fit on the active servers: no 3 servers with 8 GPUs with 70 GB (labels "
                                "zone=a) even when idle; the most there are is 2") == (
            "在线服务器永远放不下：即使全部空闲也没有 3 台各有 8 块 GPU 的服务器（每块 70 GB） (labels zone=a)；"
            "最多只有 2 台")
        assert translate_reason("waiting for task #12 to succeed") == "等待任务 #12 成功"
        assert translate_reason("array #7 runs at most 8 elements at once (%8)") == (
            "任务数组 #7 最多同时运行 8 个元素（%8）")
        assert translate_reason("waiting for reservation train-week, starts in 2 h") == (
            "等待预约 train-week，2 h 后开始")
        assert translate_reason("dependency can never be satisfied: task #4 ended timed out, it was to succeed") == (
            "依赖永远无法满足：任务 #4 以“超时”结束，而要求它成功")
        assert translate_reason("rank 1 on gpu-02 failed: exit code 3; every rank was stopped") == (
            "gpu-02 上的 rank 1 失败：退出码 3；所有 rank 均已停止")


@pytest.mark.django_db
def test_the_usage_calendar_reservations_and_gang_pages_read_in_chinese(client, alice, acme, servers):
    client.force_login(alice)
    usage = client.get("/usage/", **ZH).content.decode()
    assert "平均利用率" in usage and "按 GPU 型号" in usage and "Mean utilisation" not in usage
    calendar = client.get("/calendar/", **ZH).content.decode()
    assert "预约日历" in calendar and "所有服务器" in calendar and "Booking calendar" not in calendar
    reservations = client.get("/reservations/", **ZH).content.decode()
    assert "申请预约" in reservations and "没有预约。" in reservations and "Weekly repeats" not in reservations
    assert "每周重复次数" in reservations and "GPU 型号的一部分" in reservations  # the form's labels and help
    from datetime import timedelta

    from django.utils import timezone

    from scheduling.models import Reservation

    soon = timezone.now() + timedelta(days=1)
    Reservation.objects.create(name="paper", tenant=acme, gpu_count=2, starts_at=soon,
                               ends_at=soon + timedelta(hours=2))
    row = client.get("/reservations/", **ZH).content.decode()
    assert '<td class="reservation-status">待审批' in row
    gang = Task.objects.create(tenant=acme, submitter=alice, name="ddp", command="torchrun train.py", gpu_count=16,
                               nodes=2, pending_reason="no 2 servers with 8 free GPUs sharing rack; best has 1")
    page = client.get(f"/tasks/{gang.pk}/", **ZH).content.decode()
    assert "没有 2 台各有 8 块空闲 GPU 的服务器，且 rack 相同；最多只有 1 台这样的服务器" in page
    assert "查看哪台服务器（rank）的输出" in page
    # The calendar's events (titles drawn by the page's script) follow the language too.
    events = client.get("/calendar/events?start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z", **ZH).json()
    assert events and all("块 GPU 中" in e["title"] for e in events if "free-capacity" in e.get("classNames", []))
