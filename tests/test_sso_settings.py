"""Single sign-on is switched on by settings alone, and a malformed group map stops the
portal at start-up instead of at somebody's login."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import django, json; django.setup(); from django.conf import settings; from django.urls import reverse; "
         "print(json.dumps([settings.AUTHENTICATION_BACKENDS, reverse('oidc_authentication_init')]))")


def _boot(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings", **env})


def test_ldap_and_oidc_come_on_by_settings_before_the_local_accounts():
    import json

    proc = _boot(LDAP_SERVER_URI="ldap://127.0.0.1:1", LDAP_USER_BASE="ou=people,dc=example,dc=org",
                 LDAP_GROUP_BASE="ou=groups,dc=example,dc=org", OIDC_OP_ISSUER="http://127.0.0.1:2",
                 SSO_GROUP_MAP='{"ml-team": "acme:member"}')
    assert proc.returncode == 0, proc.stderr
    backends, oidc_url = json.loads(proc.stdout)
    # Just before the local accounts; a login throttle set earlier (django-axes) stays first.
    assert backends[-3:] == ["portal.sso.LDAPBackend", "portal.sso.OIDCBackend",
                             "django.contrib.auth.backends.ModelBackend"]
    assert backends[:-3] in ([], ["axes.backends.AxesStandaloneBackend"])
    assert oidc_url == "/oidc/authenticate/"


def test_a_malformed_group_map_stops_the_portal_at_start_up():
    proc = _boot(SSO_GROUP_MAP='{"ml-team": "acme:boss"}')
    assert proc.returncode != 0
    assert "SSO_GROUP_MAP['ml-team'] = 'acme:boss'" in proc.stderr
