"""Operator alerts: a row in the admin (Alerts), a live banner on admin pages, and
an optional webhook (``ALERT_WEBHOOK_URL``) POSTed after commit.

Call ``raise_alert`` from anywhere, inside a transaction or not: the row is part
of the caller's transaction, and the push and the webhook happen only after it
commits, from a background thread, never while a lock is held. An alert of the
same kind for the same server/GPU/task that is still unacknowledged is not raised
twice (a server that stays lost is one alert, not one per sweep).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from typing import Any

import httpx
from django.conf import settings
from django.db import transaction

from kernel import live
from kernel.models import Alert

log = logging.getLogger(__name__)

DEFAULT_SEVERITY = {
    Alert.Kind.SERVER_LOST: Alert.Severity.CRITICAL,
    Alert.Kind.GPU_ERROR: Alert.Severity.CRITICAL,
    Alert.Kind.TASK_OOM: Alert.Severity.WARNING,
    Alert.Kind.QUEUE_WAIT: Alert.Severity.WARNING,
    Alert.Kind.MASS_SILENCE: Alert.Severity.CRITICAL,
    Alert.Kind.QUOTA_GRANT: Alert.Severity.INFO,
}
WEBHOOK_TIMEOUT_S = 5.0


def _id(obj: Any) -> int | None:
    return obj if obj is None or isinstance(obj, int) else obj.pk


def raise_alert(kind: str, message: str, node: Any = None, gpu: Any = None, task: Any = None,
                severity: str | None = None, repeat: bool = False) -> Alert:
    """Record an alert (``kind`` from ``Alert.Kind``); node/gpu/task are instances or ids.
    ``repeat`` raises it even while the same alert is open (a new, worse turn of it)."""
    if kind not in Alert.Kind.values:
        raise ValueError(f"unknown alert kind {kind!r}; use one of {', '.join(Alert.Kind.values)}")
    severity = severity or DEFAULT_SEVERITY[kind]
    refs = {"node_id": _id(node), "gpu_id": _id(gpu), "task_id": _id(task)}
    open_same = None if repeat else (
        Alert.objects.filter(kind=kind, acknowledged_at__isnull=True, **refs).order_by("-created_at").first())
    if open_same is not None:
        return open_same
    alert = Alert.objects.create(kind=kind, severity=severity, message=message[:500], **refs)
    payload = as_payload(alert)
    live.send_on_commit(live.STAFF_GROUP, "alert.raised", {"alert": payload})
    if settings.ALERT_WEBHOOK_URL:
        url = settings.ALERT_WEBHOOK_URL
        transaction.on_commit(lambda: _webhook.post(url, payload))
    return alert


def as_payload(alert: Alert) -> dict[str, Any]:
    return {
        "id": alert.pk, "kind": alert.kind, "severity": alert.severity, "message": alert.message,
        "node_id": alert.node_id, "gpu_id": alert.gpu_id, "task_id": alert.task_id,
        "created_at": alert.created_at.isoformat(),
    }


class _Webhook:
    """One background thread POSTs alerts in order; a slow receiver delays only it."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def post(self, url: str, payload: dict[str, Any]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
                self._thread.start()
        self._queue.put((url, payload))

    def _run(self) -> None:
        with httpx.Client(timeout=WEBHOOK_TIMEOUT_S) as client:
            while (item := self._queue.get()) is not None:
                url, payload = item
                for attempt in (1, 2):
                    try:
                        client.post(url, json={"source": "gpu-portal", "alert": payload}).raise_for_status()
                        break
                    except httpx.HTTPError as exc:
                        log.warning("alert webhook %s failed (attempt %d): %s", url, attempt, exc)
                self._queue.task_done()

    def drain(self, timeout: float = WEBHOOK_TIMEOUT_S) -> None:
        """Give queued posts a moment at exit, so short-lived commands still deliver."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout)


_webhook = _Webhook()
atexit.register(_webhook.drain)
