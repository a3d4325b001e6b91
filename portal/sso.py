"""Single sign-on: LDAP (django-auth-ldap) and OpenID Connect (mozilla-django-oidc).

Each is off until configured (``LDAP_SERVER_URI``; ``OIDC_OP_ISSUER``... see the settings
block "Single sign-on" and the README). Local accounts keep working beside them: Django's
ModelBackend stays in ``AUTHENTICATION_BACKENDS``.

Users are created on their first login. Their directory groups (LDAP ``groupOfNames`` cn,
or the OIDC ``groups`` claim) decide tenants and roles through ``SSO_GROUP_MAP``, a JSON
object of group -> ``"tenant-slug:member"``, ``"tenant-slug:admin"``, ``"staff"`` or
``"superuser"``; it is applied at every login, so a user removed from a group loses what
it gave. Memberships of tenants the map does not name are left alone (an operator may
have added them in the admin).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction

from portal.sso_config import ROLES, WHOLE_SITE
from tenants.models import Membership, Tenant

log = logging.getLogger(__name__)

ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}


@dataclass
class Grants:
    roles: dict[str, str] = field(default_factory=dict)  # tenant slug -> role
    staff: bool = False
    superuser: bool = False


def grants_for(groups: list[str]) -> Grants:
    grants = Grants()
    for group in groups:
        grant = settings.SSO_GROUP_MAP.get(group)
        if grant is None:
            continue
        if grant in WHOLE_SITE:
            grants.staff = True
            grants.superuser = grants.superuser or grant == "superuser"
            continue
        slug, role = grant.split(":")
        if ROLE_RANK[role] >= ROLE_RANK.get(grants.roles.get(slug, ""), -1):
            grants.roles[slug] = role
    return grants


def apply_groups(user, groups: list[str]) -> None:
    """Make the user's tenants, roles and staff flags what their groups say (see module doc)."""
    grants = grants_for(groups)
    mapped_slugs = {g.split(":")[0] for g in settings.SSO_GROUP_MAP.values() if ":" in g}
    with transaction.atomic():
        if (user.is_staff, user.is_superuser) != (grants.staff, grants.superuser):
            user.is_staff, user.is_superuser = grants.staff, grants.superuser
            user.save(update_fields=["is_staff", "is_superuser"])
        tenants = {t.slug: t for t in Tenant.objects.filter(slug__in=mapped_slugs)}
        for slug in sorted(set(grants.roles) - set(tenants)):
            log.warning("SSO_GROUP_MAP names tenant %r, which does not exist; %s gets no membership there",
                        slug, user.get_username())
        current = {m.tenant.slug: m for m in Membership.objects.filter(user=user, tenant__slug__in=mapped_slugs)
                   .select_related("tenant")}
        for slug, tenant in tenants.items():
            role = grants.roles.get(slug)
            have = current.get(slug)
            if role is None and have is not None:
                have.delete()
            elif role is not None and have is None:
                Membership.objects.create(user=user, tenant=tenant, role=role)
            elif role is not None and have.role != role:
                have.role = role
                have.save(update_fields=["role"])


# --- LDAP -----------------------------------------------------------------------------------

try:
    from django_auth_ldap.backend import LDAPBackend as _LDAPBackend
except ImportError:  # python-ldap not built: LDAP stays off (settings refuse LDAP_SERVER_URI then)
    _LDAPBackend = object  # type: ignore[assignment,misc]


class LDAPBackend(_LDAPBackend):  # type: ignore[misc,valid-type]
    """django-auth-ldap, plus the group -> tenant/role mapping after each successful bind."""

    def authenticate_ldap_user(self, ldap_user, password):
        user = super().authenticate_ldap_user(ldap_user, password)
        if user is not None:
            apply_groups(user, sorted(ldap_user.group_names))
        return user


# --- OpenID Connect ---------------------------------------------------------------------------

try:
    from mozilla_django_oidc.auth import OIDCAuthenticationBackend as _OIDCBackend
except ImportError:
    _OIDCBackend = object  # type: ignore[assignment,misc]


class OIDCBackend(_OIDCBackend):  # type: ignore[misc,valid-type]
    """mozilla-django-oidc with usernames from ``preferred_username`` and the group mapping."""

    def authenticate(self, request, **kwargs):
        import requests

        try:
            return super().authenticate(request, **kwargs)
        except requests.RequestException as exc:
            # A refused or forged code, or the provider down: nobody signs in, and the
            # callback sends the browser to the login page instead of a server error.
            log.warning("OpenID Connect sign-in failed: %s", exc)
            return None

    def filter_users_by_claims(self, claims):
        username = claims.get("preferred_username")
        if not username:
            return self.UserModel.objects.none()
        return self.UserModel.objects.filter(username=username)

    def create_user(self, claims):
        user = self.UserModel.objects.create_user(
            claims["preferred_username"], claims.get("email", ""), first_name=claims.get("given_name", ""),
            last_name=claims.get("family_name", ""))
        user.set_unusable_password()  # signs in through the provider only
        user.save(update_fields=["password"])
        apply_groups(user, list(claims.get("groups") or []))
        return user

    def update_user(self, user, claims):
        apply_groups(user, list(claims.get("groups") or []))
        return user


def login_options(request) -> dict[str, bool]:
    """Template context: whether the login page offers OpenID Connect (LDAP uses the form)."""
    return {"sso_oidc": bool(settings.OIDC_OP_ISSUER)}
