"""LDAP single sign-on against a real directory: Debian's slapd, started here on a free
port with its own database. A directory user logs in with their directory password, is
created on the first login, lands in the tenant (and role) their groups map to, and loses
it when removed from the group; local accounts keep working beside LDAP."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from django.contrib.auth import authenticate, get_user_model
from django.test import Client

from tenants.models import Membership
from tests.agent_live import stop, wait_for_port
from tests.conftest import free_port

SLAPD = "/usr/sbin/slapd"
BASE = "dc=example,dc=org"
ROOT_DN, ROOT_PW = f"cn=admin,{BASE}", "directory-root-pw"

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(not os.path.exists(SLAPD),
                       reason="slapd not installed: apt-get install -y slapd ldap-utils (.ci/run does it)"),
]


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    import ldap
    import ldap.modlist

    home = tmp_path_factory.mktemp("people-slapd")
    (home / "db").mkdir()
    conf = home / "slapd.conf"
    conf.write_text(f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {home}/slapd.pid
database mdb
maxsize 10485760
suffix "{BASE}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {home}/db
""")
    port = free_port()
    uri = f"ldap://127.0.0.1:{port}"
    log = open(home / "slapd.log", "wb")  # noqa: SIM115 - closed with the process
    # -d keeps slapd in the foreground (a child of this test), logging to the file above.
    proc = subprocess.Popen([SLAPD, "-f", str(conf), "-h", uri + "/", "-d", "256"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port)
        conn = ldap.initialize(uri)
        conn.simple_bind_s(ROOT_DN, ROOT_PW)

        def add(dn: str, attrs: dict[str, list[str]]) -> None:
            conn.add_s(dn, ldap.modlist.addModlist({k: [v.encode() for v in vs] for k, vs in attrs.items()}))

        add(BASE, {"objectClass": ["dcObject", "organization"], "dc": ["example"], "o": ["Example Lab"]})
        add(f"ou=people,{BASE}", {"objectClass": ["organizationalUnit"], "ou": ["people"]})
        add(f"ou=groups,{BASE}", {"objectClass": ["organizationalUnit"], "ou": ["groups"]})
        for uid, given, pw in (("dana", "Dana", "dana-ldap-pw"), ("erin", "Erin", "erin-ldap-pw")):
            add(f"uid={uid},ou=people,{BASE}", {
                "objectClass": ["inetOrgPerson"], "uid": [uid], "cn": [f"{given} Zhang"], "sn": ["Zhang"],
                "givenName": [given], "mail": [f"{uid}@example.org"], "userPassword": [pw]})
        add(f"cn=ml-team,ou=groups,{BASE}", {"objectClass": ["groupOfNames"], "cn": ["ml-team"],
                                             "member": [f"uid=dana,ou=people,{BASE}", f"uid=erin,ou=people,{BASE}"]})
        add(f"cn=ml-leads,ou=groups,{BASE}", {"objectClass": ["groupOfNames"], "cn": ["ml-leads"],
                                              "member": [f"uid=erin,ou=people,{BASE}"]})
        conn.unbind_s()
        yield {"uri": uri, "proc": proc, "home": Path(home)}
    finally:
        stop(proc)


@pytest.fixture
def ldap_on(settings, directory, acme):
    import ldap
    from django_auth_ldap.config import GroupOfNamesType, LDAPSearch

    settings.AUTH_LDAP_SERVER_URI = directory["uri"]
    settings.AUTH_LDAP_BIND_DN = ROOT_DN
    settings.AUTH_LDAP_BIND_PASSWORD = ROOT_PW
    settings.AUTH_LDAP_USER_SEARCH = LDAPSearch(f"ou=people,{BASE}", ldap.SCOPE_SUBTREE, "(uid=%(user)s)")
    settings.AUTH_LDAP_GROUP_SEARCH = LDAPSearch(f"ou=groups,{BASE}", ldap.SCOPE_SUBTREE, "(objectClass=groupOfNames)")
    settings.AUTH_LDAP_GROUP_TYPE = GroupOfNamesType(name_attr="cn")
    settings.AUTH_LDAP_USER_ATTR_MAP = {"first_name": "givenName", "last_name": "sn", "email": "mail"}
    settings.AUTHENTICATION_BACKENDS = ["portal.sso.LDAPBackend", "django.contrib.auth.backends.ModelBackend"]
    settings.SSO_GROUP_MAP = {"ml-team": "acme:member", "ml-leads": "acme:admin", "gpu-ops": "staff"}
    return directory


def test_a_directory_user_is_created_at_first_login_in_the_tenant_their_group_maps_to(ldap_on, acme):
    assert authenticate(username="dana", password="wrong") is None
    assert not get_user_model().objects.filter(username="dana").exists()
    client = Client()
    response = client.post("/accounts/login/", {"username": "dana", "password": "dana-ldap-pw"})
    assert response.status_code == 302, response.content.decode()[:500]
    dana = get_user_model().objects.get(username="dana")
    assert (dana.first_name, dana.email, dana.is_staff) == ("Dana", "dana@example.org", False)
    assert list(Membership.objects.filter(user=dana).values_list("tenant__slug", "role")) == [("acme", "member")]
    assert "Acme Research" in client.get("/").content.decode()  # the portal shows her tenant


def test_the_strongest_mapped_group_gives_the_role(ldap_on, acme):
    erin = authenticate(username="erin", password="erin-ldap-pw")
    assert erin is not None
    assert Membership.objects.get(user=erin, tenant=acme).role == Membership.Role.ADMIN


def test_leaving_a_group_removes_what_it_gave_at_the_next_login(ldap_on, acme):
    import ldap

    dana = authenticate(username="dana", password="dana-ldap-pw")
    assert Membership.objects.filter(user=dana, tenant=acme).exists()
    conn = ldap.initialize(ldap_on["uri"])
    conn.simple_bind_s(ROOT_DN, ROOT_PW)
    group = f"cn=ml-team,ou=groups,{BASE}"
    conn.modify_s(group, [(ldap.MOD_DELETE, "member", [f"uid=dana,ou=people,{BASE}".encode()])])
    try:
        authenticate(username="dana", password="dana-ldap-pw")
        assert not Membership.objects.filter(user=dana, tenant=acme).exists()
    finally:
        conn.modify_s(group, [(ldap.MOD_ADD, "member", [f"uid=dana,ou=people,{BASE}".encode()])])
        conn.unbind_s()


def test_local_accounts_keep_working_beside_ldap(ldap_on, alice):
    assert authenticate(username="alice", password="pw-alice") == alice
