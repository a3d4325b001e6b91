"""OpenID Connect single sign-on against a small provider run by the test (authorize,
token, userinfo and JWKS endpoints over real HTTP, RS256-signed ID tokens): a user who
signs in at the provider is created on first login, mapped by their groups claim, and
local accounts keep working."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from django.contrib.auth import authenticate, get_user_model
from django.test import Client
from django.urls import include, path

from portal.urls import urlpatterns as portal_urlpatterns
from tenants.models import Membership
from tests.conftest import free_port

pytestmark = pytest.mark.django_db
CLIENT_ID, CLIENT_SECRET = "gpu-portal", "oidc-client-secret"

# The RP's URLs as settings with OIDC_OP_ISSUER set would have them (this module is the URLconf).
urlpatterns = [path("oidc/", include("mozilla_django_oidc.urls")), *portal_urlpatterns]


class Provider:
    """Just enough of an OpenID provider for the authorization-code flow."""

    def __init__(self, claims: dict) -> None:
        self.claims = claims
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.codes: dict[str, str] = {}  # code -> nonce
        self.tokens: set[str] = set()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self):
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _json(self, body: dict, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/authorize":  # the user "signs in" at once
                    assert query["client_id"] == CLIENT_ID and query["response_type"] == "code"
                    code = secrets.token_urlsafe(16)
                    provider.codes[code] = query["nonce"]
                    self.send_response(302)
                    self.send_header("Location", query["redirect_uri"] + "?" +
                                     urlencode({"code": code, "state": query["state"]}))
                    self.end_headers()
                elif url.path == "/jwks":
                    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(provider.key.public_key(), as_dict=True)
                    self._json({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]})
                elif url.path == "/userinfo":
                    token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    if token not in provider.tokens:
                        self._json({"error": "invalid_token"}, 401)
                    else:
                        self._json(provider.claims)
                else:
                    self._json({"error": "not_found"}, 404)

            def do_POST(self) -> None:
                form = {k: v[0] for k, v in
                        parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
                if self.path != "/token" or form.get("client_secret") != CLIENT_SECRET:
                    self._json({"error": "invalid_client"}, 401)
                    return
                nonce = provider.codes.pop(form["code"], None)
                if nonce is None:
                    self._json({"error": "invalid_grant"}, 400)
                    return
                now = int(time.time())
                id_token = jwt.encode({"iss": provider.url, "aud": CLIENT_ID, "sub": provider.claims["sub"],
                                       "nonce": nonce, "iat": now, "exp": now + 300},
                                      provider.key, algorithm="RS256", headers={"kid": "k1"})
                access = secrets.token_urlsafe(16)
                provider.tokens.add(access)
                self._json({"id_token": id_token, "access_token": access, "token_type": "Bearer", "expires_in": 300})

        return Handler

    def __enter__(self) -> Provider:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def provider(settings, acme):
    claims = {"sub": "f-123", "preferred_username": "frank", "email": "frank@example.org", "given_name": "Frank",
              "family_name": "Li", "groups": ["ml-leads", "other-lab"]}
    with Provider(claims) as p:
        settings.ROOT_URLCONF = __name__
        settings.OIDC_OP_ISSUER = p.url
        settings.OIDC_RP_CLIENT_ID, settings.OIDC_RP_CLIENT_SECRET = CLIENT_ID, CLIENT_SECRET
        settings.OIDC_RP_SIGN_ALGO = "RS256"
        settings.OIDC_RP_SCOPES = "openid email profile groups"
        settings.LOGIN_REDIRECT_URL_FAILURE = "/accounts/login/"
        settings.OIDC_OP_AUTHORIZATION_ENDPOINT = f"{p.url}/authorize"
        settings.OIDC_OP_TOKEN_ENDPOINT = f"{p.url}/token"
        settings.OIDC_OP_USER_ENDPOINT = f"{p.url}/userinfo"
        settings.OIDC_OP_JWKS_ENDPOINT = f"{p.url}/jwks"
        settings.AUTHENTICATION_BACKENDS = ["portal.sso.OIDCBackend", "django.contrib.auth.backends.ModelBackend"]
        settings.SSO_GROUP_MAP = {"ml-team": "acme:member", "ml-leads": "acme:admin"}
        yield p


def _sign_in(client: Client) -> str:
    """Browser steps: the portal sends us to the provider, which sends us back with a code."""
    start = client.get("/oidc/authenticate/")
    assert start.status_code == 302 and start["Location"].startswith(settings_url("/authorize"))
    back = requests.get(start["Location"], allow_redirects=False, timeout=10)
    assert back.status_code == 302
    callback = urlparse(back.headers["Location"])
    done = client.get(f"{callback.path}?{callback.query}")
    return done["Location"]


def settings_url(path_: str) -> str:
    from django.conf import settings

    return settings.OIDC_OP_ISSUER + path_


def test_a_provider_user_is_created_at_first_login_and_mapped_by_groups(provider, acme):
    client = Client()
    assert 'id="sso-login" href="/oidc/authenticate/"' in client.get("/accounts/login/").content.decode()
    assert _sign_in(client) == "/"
    frank = get_user_model().objects.get(username="frank")
    assert (frank.email, frank.first_name, frank.has_usable_password()) == ("frank@example.org", "Frank", False)
    assert Membership.objects.get(user=frank, tenant=acme).role == Membership.Role.ADMIN
    assert "Acme Research" in client.get("/").content.decode()

    # The next login finds the same user and follows their groups as they are now.
    provider.claims["groups"] = ["ml-team"]
    assert _sign_in(Client()) == "/"
    assert get_user_model().objects.filter(username="frank").count() == 1
    assert Membership.objects.get(user=frank, tenant=acme).role == Membership.Role.MEMBER


def test_a_forged_code_signs_nobody_in_and_local_accounts_still_work(provider, alice):
    client = Client()
    start = client.get("/oidc/authenticate/")
    state = parse_qs(urlparse(start["Location"]).query)["state"][0]
    failed = client.get("/oidc/callback/", {"code": "made-up", "state": state})
    assert (failed.status_code, failed["Location"]) == (302, "/accounts/login/")
    assert not get_user_model().objects.filter(username="frank").exists()
    assert client.get("/").status_code == 302  # still signed out
    assert authenticate(username="alice", password="pw-alice") == alice
