"""runscheduler while the database is unreachable: it backs off (one log line per
outage, not a traceback per attempt) and still stops promptly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from scheduling.management.commands.runscheduler import next_db_backoff
from tests.agent_live import ROOT
from tests.conftest import free_port, wait_for


def test_the_database_backoff_doubles_up_to_its_cap():
    delays, current = [], 0.0
    for _ in range(8):
        current = next_db_backoff(current, cap_s=2.0)
        delays.append(current)
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_with_the_database_down_it_logs_once_backs_off_and_stops_promptly_on_sigterm(tmp_path):
    nobody = f"postgresql://portal@127.0.0.1:{free_port()}/portal"  # nothing listens there
    log = tmp_path / "scheduler.log"
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": nobody, "PYTHONUNBUFFERED": "1", "PORTAL_REGISTRY": "false",
           "SECRET_KEY": "test-only"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "manage.py", "runscheduler", "--max-db-backoff-s", "0.5"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "database unreachable" in log.read_text(), 30, "the outage to be noticed")
        time.sleep(3)  # let it retry a few times: the log must not grow per attempt
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 2
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert text.count("database unreachable") == 1, text
    assert "Traceback" not in text, text
