"""Reservations: the one place they are requested, booked, approved, rejected and released.

- A tenant admin (or staff) requests N GPUs (optionally of a GPU model, on servers with
  given labels, or on named servers) for [start, end), optionally repeated weekly. A
  request that could not be booked right now is refused with the reason (which
  reservation already holds the GPUs, and when).
- Staff approve or reject it; a tenant's ``ReservationPolicy`` approves it on the spot
  while its approved GPU-hours in the coming week stay within the policy.
- Approval books concrete GPUs (``ReservationSlot`` rows, one per GPU and occurrence)
  under the scheduler lock, so a pass never sees half a booking; the database refuses
  overlapping slots on one GPU whatever the Python does.
- The tenant may release unused GPUs early: those its tasks do not hold now.
- The scheduler learns of approved windows in its snapshot (``snapshot_windows``) and the
  sweep wakes it at every window bound (``next_bound_at``).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, connection, transaction
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.utils import timezone
from django.utils.translation import gettext

from nodes.models import GPU, Node, NodeStatus
from scheduling import access, triggers
from scheduling.lock import lock_scheduler
from scheduling.models import Allocation, Reservation, ReservationPolicy, ReservationSlot
from scheduling.placement import ReservationWindow
from tenants.models import Tenant

MAX_REPEAT_WEEKS = 52
MAX_WINDOW_DAYS = 31
MAX_AHEAD_DAYS = 366
WEEK = timedelta(weeks=1)


class ReservationError(Exception):
    """Refused with a reason a person can act on (400 in the API, a message in the pages)."""

    def __init__(self, message: str, field: str = "non_field_errors") -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _utc(when: datetime) -> str:
    return f"{timezone.localtime(when, timezone.get_fixed_timezone(0)):%Y-%m-%d %H:%M} UTC"


# --- request form (portal page, admin and API share it) ---------------------------------

class ReservationRequestForm(forms.ModelForm):
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.none(), to_field_name="slug")
    nodes = forms.ModelMultipleChoiceField(queryset=Node.objects.all(), to_field_name="name", required=False)
    gpu_count = forms.IntegerField(min_value=1, max_value=100_000)

    class Meta:
        model = Reservation
        fields = ["name", "tenant", "gpu_count", "gpu_model", "node_selector", "nodes", "starts_at", "ends_at",
                  "repeat_weeks", "reason"]

    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        # Implied when the user may ask for exactly one tenant (like a task submit).
        self.fields["tenant"].required = False
        self.fields["tenant"].queryset = access.administered_tenants(user)
        self.fields["tenant"].error_messages["invalid_choice"] = (
            gettext("Pick a tenant you are an admin of (only tenant admins may reserve GPUs)."))
        self.fields["node_selector"].required = False

    def clean_node_selector(self) -> dict[str, str]:
        value = self.cleaned_data.get("node_selector") or {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise forms.ValidationError(gettext('An object of label names to strings, e.g. {"zone": "a"}.'))
        return value

    def clean_tenant(self):
        tenant = self.cleaned_data.get("tenant")
        if tenant is None:
            mine = list(self.fields["tenant"].queryset[:2])
            if len(mine) != 1:
                raise forms.ValidationError(gettext("Required: name the tenant."))
            tenant = mine[0]
        return tenant

    def clean(self):
        data = super().clean()
        start, end = data.get("starts_at"), data.get("ends_at")
        repeat = data.get("repeat_weeks") or 0
        if start and end:
            now = timezone.now()
            if end <= start:
                self.add_error("ends_at", gettext("The window must end after it starts."))
            elif end <= now:
                self.add_error("ends_at", gettext("The window is already over."))
            elif end - start > timedelta(days=MAX_WINDOW_DAYS):
                self.add_error("ends_at", gettext("A window lasts at most %(n)s days.") % {"n": MAX_WINDOW_DAYS})
            elif repeat and end - start > WEEK:
                self.add_error("repeat_weeks", gettext("A weekly reservation's window lasts at most a week."))
            elif start - now > timedelta(days=MAX_AHEAD_DAYS):
                self.add_error("starts_at", gettext("Reserve at most %(n)s days ahead.") % {"n": MAX_AHEAD_DAYS})
        if repeat > MAX_REPEAT_WEEKS:
            self.add_error("repeat_weeks", gettext("At most %(n)s weekly repeats.") % {"n": MAX_REPEAT_WEEKS})
        return data


def reservations_for(user):
    """Reservations ``user`` sees in full: their tenants' (all for staff)."""
    return Reservation.objects.filter(tenant__in=access.tenants_for(user))


def can_manage(user, reservation: Reservation) -> bool:
    return user.is_staff or reservation.tenant_id in access.admin_tenant_ids(user)


# --- booking ------------------------------------------------------------------------------

def _candidates(res: Reservation, node_names: list[str] | None = None) -> list[tuple[int, int, str]]:
    """(gpu id, node id, node name) of GPUs matching the request, on servers not offline."""
    qs = GPU.objects.filter(reserved=False).exclude(node__status=NodeStatus.OFFLINE).select_related("node")
    if res.gpu_model:
        qs = qs.filter(model_name__icontains=res.gpu_model)
    if res.pk and node_names is None:
        node_names = list(res.nodes.values_list("name", flat=True))
    if node_names:
        qs = qs.filter(node__name__in=node_names)
    out = []
    for gpu in qs.order_by("node__name", "index"):
        labels = gpu.node.labels or {}
        if all(str(labels.get(k)) == str(v) and k in labels for k, v in (res.node_selector or {}).items()):
            out.append((gpu.pk, gpu.node_id, gpu.node.name))
    return out


def _booked_over(res: Reservation, gpu_ids: list[int]) -> dict[int, ReservationSlot]:
    """GPUs among ``gpu_ids`` another approved reservation books during any occurrence of ``res``."""
    clash: dict[int, ReservationSlot] = {}
    for start, end in res.occurrences():
        for slot in (ReservationSlot.objects.filter(gpu_id__in=gpu_ids, period__overlap=DateTimeTZRange(start, end))
                     .exclude(reservation_id=res.pk).select_related("reservation__tenant")):
            clash.setdefault(slot.gpu_id, slot)
    return clash


def plan_booking(res: Reservation, node_names: list[str] | None = None) -> list[int]:
    """The GPUs this reservation would book, or ReservationError saying why it cannot.

    Whole servers first (the ones with most bookable GPUs), so a gang fits on one server."""
    candidates = _candidates(res, node_names)
    if not candidates:
        return _refuse_none(res)
    clash = _booked_over(res, [g for g, _n, _name in candidates])
    free_by_node: dict[int, list[int]] = defaultdict(list)
    for gpu_id, node_id, _name in candidates:
        if gpu_id not in clash:
            free_by_node[node_id].append(gpu_id)
    free = sum(len(v) for v in free_by_node.values())
    if free < res.gpu_count:
        holders: dict[int, list[ReservationSlot]] = defaultdict(list)
        for slot in clash.values():
            holders[slot.reservation_id].append(slot)
        who = "; ".join(
            gettext("%(name)s (%(tenant)s) books %(n)s of them from %(start)s to %(end)s") % {
                "name": slots[0].reservation.name, "tenant": slots[0].reservation.tenant.slug, "n": len(slots),
                "start": _utc(slots[0].period.lower), "end": _utc(slots[0].period.upper)}
            for slots in holders.values())
        raise ReservationError(
            gettext("conflict: only %(free)s of the %(n)s matching GPUs are free over that window, %(asked)s asked; "
                    "%(who)s")
            % {"free": free, "n": len(candidates), "asked": res.gpu_count, "who": who})
    # GPUs held by work that may still run at the start are taken last (that work is never
    # killed: it keeps them until it ends, and the window waits for them).
    busy = _busy_at(res.starts_at, [g for gl in free_by_node.values() for g in gl])
    chosen: list[int] = []
    ranked = sorted(free_by_node.items(),
                    key=lambda kv: (-sum(g not in busy for g in kv[1]), -len(kv[1]), kv[0]))
    for _node, gpus in ranked:
        gpus = sorted(gpus, key=lambda g: (g in busy, g))
        chosen.extend(gpus[: res.gpu_count - len(chosen)])
        if len(chosen) == res.gpu_count:
            break
    return chosen


def _busy_at(when: datetime, gpu_ids: list[int]) -> set[int]:
    """GPUs whose current holders may still run at ``when`` (by their timeouts)."""
    busy = set()
    for gpu_id, since, timeout_s in (Allocation.objects.filter(gpu_id__in=gpu_ids, released_at__isnull=True)
                                     .values_list("gpu_id", "task__started_at", "task__timeout_s")):
        if since is None or since + timedelta(seconds=timeout_s) > when:
            busy.add(gpu_id)
    return busy


def _refuse_none(res: Reservation) -> list[int]:
    what = []
    if res.gpu_model:
        what.append(gettext("GPU model '%(model)s'") % {"model": res.gpu_model})
    if res.node_selector:
        labels = ", ".join(f"{k}={v}" for k, v in res.node_selector.items())
        what.append(gettext("labels %(labels)s") % {"labels": labels})
    raise ReservationError(gettext("no GPU matches the request") + (f" ({'; '.join(what)})" if what else ""))


def next_bound(res: Reservation, now: datetime) -> datetime | None:
    bounds = [b for s, e in res.occurrences() for b in (s, e) if b > now]
    return min(bounds) if bounds else None


# --- request, decide, release ---------------------------------------------------------------

def request(form: ReservationRequestForm) -> Reservation:
    """Save a valid request; refuse it now if it could not be booked; approve it at once
    when the tenant's policy covers it."""
    with transaction.atomic():
        res: Reservation = form.save(commit=False)
        res.requested_by = form.user
        res.state = Reservation.State.REQUESTED
        node_names = [n.name for n in form.cleaned_data.get("nodes") or []]
        plan_booking(res, node_names)  # refuse conflicts with the reason, before anything is saved
        res.save()
        form.save_m2m()
    if _policy_covers(res):
        try:
            return decide(res.pk, approve=True, by=None, note="approved by the tenant's reservation policy")
        except ReservationError:
            pass  # booked by someone else meanwhile: staff decide
    return res


def _policy_covers(res: Reservation) -> bool:
    policy = ReservationPolicy.objects.filter(tenant_id=res.tenant_id).first()
    if policy is None or not policy.auto_approve_gpu_hours_per_week:
        return False
    now = timezone.now()
    horizon = now + WEEK
    if res.last_end > horizon:
        return False  # only what starts and ends within the coming week
    booked = 0.0
    for other in Reservation.objects.filter(tenant_id=res.tenant_id, state=Reservation.State.APPROVED):
        for s, e in other.occurrences():
            s, e = max(s, now), min(e, horizon)
            if e > s:
                booked += other.gpu_count * (e - s).total_seconds() / 3600
    return booked + res.gpu_hours() <= policy.auto_approve_gpu_hours_per_week


def decide(res_id: int, *, approve: bool, by, note: str = "") -> Reservation:
    """Approve (book its GPUs) or reject a requested reservation. ``by`` None: the policy."""

    if by is not None and not by.is_staff:
        raise PermissionDenied(gettext("Only staff approve or reject reservations."))
    with transaction.atomic():
        # Serialise with passes and other approvals: a pass sees all of a booking or none.
        lock_scheduler()
        res = Reservation.objects.select_for_update().select_related("tenant").get(pk=res_id)
        if res.state != Reservation.State.REQUESTED:
            raise ReservationError(gettext("reservation %(name)s was already %(state)s") % {
                "name": res.name, "state": res.get_state_display()}, "state")
        now = timezone.now()
        res.decided_by, res.decided_at, res.decision_note = by, now, note[:500]
        if not approve:
            res.state = Reservation.State.REJECTED
            res.save(update_fields=["state", "decided_by", "decided_at", "decision_note"])
            return res
        gpus = plan_booking(res)
        try:
            with transaction.atomic():
                ReservationSlot.objects.bulk_create(
                    ReservationSlot(reservation=res, gpu_id=g, period=DateTimeTZRange(s, e))
                    for s, e in res.occurrences() for g in gpus)
        except IntegrityError as exc:  # pragma: no cover - plan_booking ran under the same lock
            raise ReservationError(f"conflict: another reservation booked those GPUs ({exc})") from exc
        res.state = Reservation.State.APPROVED
        res.next_bound_at = next_bound(res, now)
        res.save(update_fields=["state", "decided_by", "decided_at", "decision_note", "next_bound_at"])
        triggers.request_pass(f"reservation {res.name} approved")
    return res


def release_unused(res_id: int, *, by) -> int:
    """Give back the GPUs the tenant's tasks do not hold now: from the open window (or, if
    none is open, every remaining occurrence). Returns how many GPU bookings were freed."""
    with transaction.atomic():
        res = Reservation.objects.select_for_update().get(pk=res_id)
        if not can_manage(by, res):
            raise PermissionDenied(gettext("Only a tenant admin of its tenant or staff may release a reservation."))
        if res.state != Reservation.State.APPROVED:
            raise ReservationError(gettext("reservation %(name)s is %(state)s, not approved") % {
                "name": res.name, "state": res.get_state_display()}, "state")
        now = timezone.now()
        in_use = set(Allocation.objects.filter(released_at__isnull=True, task__tenant_id=res.tenant_id)
                     .values_list("gpu_id", flat=True))
        slots = ReservationSlot.objects.filter(reservation=res, period__upper_inf=False)
        open_now = slots.filter(period__contains=now)
        if open_now.exists():
            freed, _ = open_now.exclude(gpu_id__in=in_use).delete()
        else:
            freed, _ = slots.filter(period__startswith__gt=now).delete()
        if not ReservationSlot.objects.filter(reservation=res, period__endswith__gt=now).exists():
            res.state, res.released_at, res.next_bound_at = Reservation.State.RELEASED, now, None
            res.save(update_fields=["state", "released_at", "next_bound_at"])
        if freed:
            triggers.request_pass(f"reservation {res.name}: {freed} GPU booking(s) released")
    return freed


# --- the scheduler's view ---------------------------------------------------------------------

WINDOWS_SQL = f"""
SELECT r.id, r.name, r.tenant_id, lower(s.period), upper(s.period), array_agg(s.gpu_id ORDER BY s.gpu_id)
FROM scheduling_reservationslot s JOIN scheduling_reservation r ON r.id = s.reservation_id
WHERE r.state = '{Reservation.State.APPROVED}'
  -- the pass's clock: the given now, else its lock's (the same statement_timestamp() for its batch)
  AND upper(s.period) > coalesce(%(now)s::timestamptz, statement_timestamp())
GROUP BY r.id, r.name, r.tenant_id, lower(s.period), upper(s.period)
ORDER BY r.id, lower(s.period)
"""  # noqa: S608


def snapshot_windows(now: datetime) -> list[ReservationWindow]:
    """Each approved reservation's open or next occurrence, for the placement core."""
    with connection.cursor() as cursor:
        cursor.execute(WINDOWS_SQL, {"now": now})
        return windows_from_rows(cursor.fetchall())


def windows_from_rows(rows: list[tuple]) -> list[ReservationWindow]:
    """``snapshot_windows`` from the rows of ``WINDOWS_SQL`` (the pass reads them in its batch)."""
    out: dict[int, ReservationWindow] = {}
    for rid, name, tenant_id, start, end, gpu_ids in rows:
        if rid not in out:  # the earliest occurrence not over yet
            out[rid] = ReservationWindow(id=rid, name=name, tenant_id=tenant_id, gpu_ids=frozenset(gpu_ids),
                                         starts_at=start, ends_at=end)
    return list(out.values())


def wake_at_bounds(now: datetime) -> int:
    """Called by the sweep with the database's clock: approved reservations whose window
    opened or closed since the last look get a pass (their GPUs change hands) and their
    next bound recorded."""
    due = list(Reservation.objects.select_for_update(of=("self",))
               .filter(state=Reservation.State.APPROVED, next_bound_at__lte=now).order_by("pk"))
    for res in due:
        res.next_bound_at = next_bound(res, now)
        res.save(update_fields=["next_bound_at"])
    return len(due)  # the sweep asks for a pass when this is not 0


def as_row(res: Reservation, now: datetime | None = None) -> dict[str, Any]:
    """What pages and the API show of a reservation."""
    now = now or timezone.now()
    occ = res.occurrences()
    if res.state == Reservation.State.APPROVED:
        status = ("active" if any(s <= now < e for s, e in occ) else
                  "over" if occ[-1][1] <= now else "upcoming")
    else:
        status = res.state
    return {"id": res.pk, "name": res.name, "tenant": res.tenant.slug, "gpu_count": res.gpu_count,
            "gpu_model": res.gpu_model, "node_selector": res.node_selector,
            "starts_at": res.starts_at, "ends_at": res.ends_at, "repeat_weeks": res.repeat_weeks,
            "reason": res.reason, "state": res.state, "status": status,
            "requested_by": res.requested_by.get_username() if res.requested_by else None,
            "decided_by": res.decided_by.get_username() if res.decided_by else None,
            "decision_note": res.decision_note}
