"""``SSO_GROUP_MAP`` read and checked at start-up (imported by the settings, so no models here)."""

from __future__ import annotations

import json

from django.core.exceptions import ImproperlyConfigured

ROLES = ("member", "admin")  # tenants.models.Membership.Role values, weakest first
WHOLE_SITE = ("staff", "superuser")


def parse_group_map(text: str) -> dict[str, str]:
    """A mistake in the map fails loudly at start-up, not at someone's login."""
    if not text:
        return {}
    try:
        mapping = json.loads(text)
    except ValueError as exc:
        raise ImproperlyConfigured(f"SSO_GROUP_MAP is not JSON: {exc}") from None
    if not isinstance(mapping, dict):
        raise ImproperlyConfigured("SSO_GROUP_MAP must be a JSON object of group -> grant")
    for group, grant in mapping.items():
        ok = grant in WHOLE_SITE or (isinstance(grant, str) and grant.count(":") == 1 and grant.split(":")[1] in ROLES)
        if not ok:
            raise ImproperlyConfigured(f"SSO_GROUP_MAP[{group!r}] = {grant!r}: use 'tenant:member', "
                                       "'tenant:admin', 'staff' or 'superuser'")
    return mapping
