"""The booking calendar's data: reservations as events and free GPUs per day.

Every tenant's approved bookings are public inside the portal (name, tenant, GPU count,
servers): people plan around each other's deadlines. Requests are shown only to their
own tenants (and staff). Free capacity per day is the cluster's schedulable GPUs minus
the most GPUs booked at any one time that day.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.db.models import Q
from django.utils.translation import gettext

from nodes.models import GPU, NodeStatus
from scheduling import access
from scheduling.models import Reservation, ReservationSlot

# Colours by state; the portal's palette.
COLOURS = {"approved": "#2563eb", "requested": "#d97706"}


def events(user, start: datetime, end: datetime, server: str | None = None) -> list[dict[str, Any]]:
    window = DateTimeTZRange(start, end)
    slots = ReservationSlot.objects.filter(period__overlap=window, reservation__state=Reservation.State.APPROVED)
    gpus = GPU.objects.filter(reserved=False).exclude(node__status=NodeStatus.OFFLINE)
    if server:
        slots = slots.filter(gpu__node__name=server)
        gpus = gpus.filter(node__name=server)
    total = gpus.count()
    # (reservation, occurrence) -> servers and GPU count
    booked: dict[tuple, dict[str, Any]] = {}
    for res_id, name, tenant, period, node_name in slots.values_list(
            "reservation_id", "reservation__name", "reservation__tenant__slug", "period", "gpu__node__name"):
        ev = booked.setdefault((res_id, period.lower), {"name": name, "tenant": tenant, "start": period.lower,
                                                         "end": period.upper, "gpus": 0, "servers": set()})
        ev["gpus"] += 1
        ev["servers"].add(node_name)
    out: list[dict[str, Any]] = []
    for (res_id, _s), ev in sorted(booked.items(), key=lambda kv: kv[1]["start"]):
        servers = ", ".join(sorted(ev["servers"]))
        title = gettext("%(name)s · %(tenant)s · %(n)s GPUs (%(servers)s)") % {
            "name": ev["name"], "tenant": ev["tenant"], "n": ev["gpus"], "servers": servers}
        out.append({"id": f"r{res_id}-{ev['start'].isoformat()}", "title": title,
                    "start": ev["start"].isoformat(), "end": ev["end"].isoformat(),
                    "color": COLOURS["approved"],
                    "extendedProps": {"reservation": ev["name"], "tenant": ev["tenant"], "gpus": ev["gpus"],
                                      "servers": servers, "state": "approved"}})
    mine = Q(tenant__in=access.tenants_for(user))
    for res in (Reservation.objects.filter(mine, state=Reservation.State.REQUESTED).select_related("tenant")):
        for s, e in res.occurrences():
            if e > start and s < end:
                out.append({"id": f"q{res.pk}-{s.isoformat()}",
                            "title": gettext("%(name)s · %(tenant)s · %(n)s GPUs (requested)")
                            % {"name": res.name, "tenant": res.tenant.slug, "n": res.gpu_count},
                            "start": s.isoformat(), "end": e.isoformat(), "color": COLOURS["requested"],
                            "extendedProps": {"reservation": res.name, "tenant": res.tenant.slug,
                                              "gpus": res.gpu_count, "state": "requested"}})
    out.extend(_free_per_day(booked.values(), total, start, end))
    return out


def _free_per_day(booked, total: int, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """One all-day event per day: "12 of 16 GPUs free" (the fewest free at any time that day)."""
    out = []
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        nxt = day + timedelta(days=1)
        # Peak booked GPUs in [day, nxt): sweep the bookings' starts and ends.
        changes: dict[datetime, int] = defaultdict(int)
        for ev in booked:
            s, e = max(ev["start"], day), min(ev["end"], nxt)
            if e > s:
                changes[s] += ev["gpus"]
                changes[e] -= ev["gpus"]
        peak = level = 0
        for t in sorted(changes):
            level += changes[t]
            peak = max(peak, level)
        free = max(0, total - peak)
        title = gettext("%(free)s of %(total)s GPUs free") % {"free": free, "total": total}
        out.append({"id": f"free-{day.date().isoformat()}", "title": title,
                    "start": day.date().isoformat(), "allDay": True, "display": "block",
                    "color": "#16a34a" if free else "#dc2626", "classNames": ["free-capacity"],
                    "extendedProps": {"free": free, "total": total}})
        day = nxt
    return out
