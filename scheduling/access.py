"""Who may see and touch which tasks: the ONE place tenant isolation is decided.

Every user-facing view (REST API, portal pages, CLI through the API) gets its
tasks from ``tasks_for(user)`` and asks ``can_cancel(user, task)`` before a
cancel. A task outside ``tasks_for(user)`` does not exist for that user (404),
so nobody learns which ids belong to other tenants.

- staff see and may cancel every task;
- a member of a tenant sees all of that tenant's tasks and cancels their own;
- a tenant admin (``Membership.Role.ADMIN``) also cancels anyone's task in that tenant.
"""

from __future__ import annotations

from django.db.models import QuerySet

from scheduling import usage
from scheduling.models import Task
from tenants.models import Membership, Tenant


def tenants_for(user) -> QuerySet[Tenant]:
    """Tenants whose tasks ``user`` sees (all of them for staff)."""
    if not user.is_authenticated:
        return Tenant.objects.none()
    if user.is_staff:
        return Tenant.objects.all()
    return Tenant.objects.filter(memberships__user=user)


def model_names_for(user) -> set[str] | None:
    """Model names ``user`` may see cached on GPUs (None: all, for staff): those their
    tenants' tasks use. Which models another tenant runs is that tenant's business."""
    if user.is_authenticated and user.is_staff:
        return None
    return set(tasks_for(user).exclude(model_name="").values_list("model_name", flat=True).distinct())


def tasks_for(user) -> QuerySet[Task]:
    """Tasks ``user`` sees. Start every task query of a user-facing view here."""
    if not user.is_authenticated:
        return Task.objects.none()
    if user.is_staff:
        return Task.objects.all()
    return Task.objects.filter(tenant__memberships__user=user)


def admin_tenant_ids(user) -> set[int]:
    return set(
        Membership.objects.filter(user=user, role=Membership.Role.ADMIN).values_list("tenant_id", flat=True)
    )


def administered_tenants(user) -> QuerySet[Tenant]:
    """Tenants ``user`` administers (all of them for staff): who may request reservations
    and quota grants for a tenant, and manage them."""
    if user.is_staff:
        return Tenant.objects.all()
    return Tenant.objects.filter(pk__in=admin_tenant_ids(user))


def can_cancel(user, task: Task) -> bool:
    """Assumes ``task`` came from ``tasks_for(user)`` (i.e. the user already sees it)."""
    if user.is_staff or task.submitter_id == user.pk:
        return True
    return task.tenant_id in admin_tenant_ids(user)


def usage_for(user, start, end, group_by: list[str]):
    """The usage report ``user`` may see (``scheduling.usage.report`` rows).

    Staff see every tenant. A tenant admin sees every member of that tenant. A plain
    member sees the tenant's totals, but broken down by user or task only their own
    rows: what colleagues ran stays between them and the tenant's admins.
    """

    if not user.is_authenticated:
        return []
    if user.is_staff:
        return usage.report(start, end, group_by)
    member_of = set(Membership.objects.filter(user=user).values_list("tenant_id", flat=True))
    admin_of = admin_tenant_ids(user)
    plain = member_of - admin_of
    personal = bool({"user", "task"} & set(group_by))
    if not personal or not plain:
        return usage.report(start, end, group_by, tenant_ids=member_of)
    rows = usage.report(start, end, group_by, tenant_ids=plain, user_ids=[user.pk])
    if admin_of:
        rows += usage.report(start, end, group_by, tenant_ids=admin_of)
        rows.sort(key=lambda r: -r.gpu_seconds)
    return rows
