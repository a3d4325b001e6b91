"""Temporary quota grants: the one place they are requested, approved and rejected.

A tenant admin (or staff) requests a grant for a window with a reason; staff approve or
reject it. Approval of a grant whose window is open wakes the scheduler at once; the
sweep wakes it again at each bound (``scheduling.sweep``), and the snapshot applies the
grant by the pass's clock, so it counts from ``starts_at`` and stops at ``ends_at``.
"""

from __future__ import annotations

from django import forms
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from scheduling import access, triggers
from tenants.models import QuotaGrant, Tenant

# Longest window a grant may cover: a grant is temporary by definition.
MAX_GRANT_DAYS = 366


class GrantRequestForm(forms.ModelForm):
    """What a tenant admin fills in (portal page and API share its checks)."""

    tenant = forms.ModelChoiceField(queryset=Tenant.objects.none(), to_field_name="slug")

    class Meta:
        model = QuotaGrant
        fields = ["tenant", "extra_gpus", "extra_gpu_memory_mb", "extra_running_tasks", "starts_at", "ends_at",
                  "reason"]

    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        # Implied when the user may ask for exactly one tenant (like a task submit).
        self.fields["tenant"].required = False
        self.fields["tenant"].queryset = access.administered_tenants(user)
        self.fields["tenant"].error_messages["invalid_choice"] = (
            _("Pick a tenant you are an admin of (only tenant admins may ask for extra quota)."))

    def clean_tenant(self):
        tenant = self.cleaned_data.get("tenant")
        if tenant is None:
            mine = list(self.fields["tenant"].queryset[:2])
            if len(mine) != 1:
                raise forms.ValidationError(_("Required: name the tenant."))
            tenant = mine[0]
        return tenant

    def clean(self):
        data = super().clean()
        start, end = data.get("starts_at"), data.get("ends_at")
        if start and end:
            if end <= start:
                self.add_error("ends_at", _("The window must end after it starts."))
            elif end <= timezone.now():
                self.add_error("ends_at", _("The window is already over."))
            elif (end - start).days > MAX_GRANT_DAYS:
                self.add_error("ends_at", _("A grant covers at most %(n)s days.") % {"n": MAX_GRANT_DAYS})
        if not (data.get("extra_gpus") or data.get("extra_gpu_memory_mb") or data.get("extra_running_tasks")):
            self.add_error("extra_gpus", _("Ask for at least one extra GPU, MB of GPU memory or running task."))
        return data

    def save(self, commit: bool = True) -> QuotaGrant:
        grant = super().save(commit=False)
        grant.requested_by = self.user
        grant.state = QuotaGrant.State.REQUESTED
        if commit:
            grant.save()
        return grant


def grants_for(user):
    """Grants ``user`` sees: their tenants' (every tenant's for staff)."""
    return QuotaGrant.objects.filter(tenant__in=access.tenants_for(user))


def decide(grant_id: int, *, approve: bool, by) -> QuotaGrant:
    """Approve or reject a requested grant (staff only). Deciding twice is refused."""
    if not by.is_staff:
        raise PermissionDenied(_("Only staff approve or reject quota grants."))
    with transaction.atomic():
        grant = QuotaGrant.objects.select_for_update().select_related("tenant").get(pk=grant_id)
        if grant.state != QuotaGrant.State.REQUESTED:
            raise ValueError(f"grant #{grant.pk} was already {grant.state}")
        grant.state = QuotaGrant.State.APPROVED if approve else QuotaGrant.State.REJECTED
        grant.decided_by, grant.decided_at = by, timezone.now()
        grant.save(update_fields=["state", "decided_by", "decided_at"])
        if approve and grant.active_at(grant.decided_at):
            triggers.request_pass(f"quota grant #{grant.pk} for {grant.tenant.slug} approved")
    return grant
