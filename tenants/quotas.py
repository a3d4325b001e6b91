"""Each tenant's limits beside its live usage, as users see them (API, CLI, dashboard)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from scheduling import access
from scheduling.choices import Priority
from tenants.models import FairShare, Membership, Quota, usage_of


def _fair_share(tenant) -> dict[str, Any] | None:
    try:
        fs = tenant.fair_share
    except FairShare.DoesNotExist:
        return None
    return {"factor": round(fs.factor, 4), "usage": round(fs.usage, 4), "share": round(fs.share, 4),
            "computed_at": fs.computed_at}


def quota_report(user) -> list[dict[str, Any]]:
    roles = dict(Membership.objects.filter(user=user).values_list("tenant_id", "role"))
    report = []
    tenants = list(access.tenants_for(user).select_related("quota", "fair_share").order_by("slug"))
    usages = usage_of(t.pk for t in tenants)
    for tenant in tenants:
        usage = usages[tenant.pk]
        try:
            quota: Quota | None = tenant.quota
        except Quota.DoesNotExist:
            quota = None
        limits = None
        if quota is not None:
            limits = {"max_gpus": quota.max_gpus, "max_gpu_memory_mb": quota.max_gpu_memory_mb,
                      "max_running_tasks": quota.max_running_tasks, "max_pending_tasks": quota.max_pending_tasks,
                      "max_priority": Priority(quota.max_priority).label,
                      "allowed_classes": list(quota.allowed_classes)}
        report.append({
            "tenant": tenant.slug, "name": tenant.name, "role": roles.get(tenant.pk),
            "limits": limits, "usage": asdict(usage),
            "over_limits": quota.exceeded_by(usage) if quota is not None else [],
            "fair_share": _fair_share(tenant),
        })
    return report
