"""Django settings for the GPU allocation portal.

Everything deployment-specific comes from the environment (see README,
"Configuration"); scheduler policy comes from the optional YAML file named by
``PORTAL_CONFIG``. With no ``DATABASE_URL`` the embedded PostgreSQL under
``var/pg`` is started: the project never runs on SQLite, because its
correctness rests on PostgreSQL row locks and partial unique indexes.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from portal.config import load_config
from portal.env import envbool, envint, envlist, envsecret, envstr

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = envbool("DEBUG", False)

SECRET_KEY = envsecret("SECRET_KEY")
# Production always needs a real key, whatever DEBUG says: a missing, short or
# placeholder key would let anyone forge sessions and password-reset links.
if envbool("PORTAL_PRODUCTION", False) and (
        not SECRET_KEY or len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5
        or SECRET_KEY.startswith("django-insecure-")):
    raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) must be set to a real key when PORTAL_PRODUCTION="
                               "true: at least 50 random characters, e.g. python -c 'import secrets; "
                               "print(secrets.token_urlsafe(50))'")
if not SECRET_KEY:
    # Development: a key kept in var/ so sessions survive restarts without ever
    # committing a secret.
    key_file = BASE_DIR / "var" / "secret_key"
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    SECRET_KEY = key_file.read_text().strip()

ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    # The audit's admin (its per-object "Events" button overrides an admin template).
    "pghistory.admin",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_prometheus",
    "channels",
    "channels_postgres",
    "pgtrigger",
    "pghistory",
    "kernel",
    "tenants",
    "nodes",
    "scheduling",
    "portal",
    # After portal: its qcluster command (a stop that is never lost) replaces django-q2's.
    "django_q",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "portal.middleware.DatabaseUnavailable",  # 503, not 500, while PostgreSQL is down
    "portal.middleware.RefuseUnstorableParameters",  # NUL in a query or form value: 400
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",  # English or Chinese, by the switch or the browser (issue 15)
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "portal.middleware.PageMessages",  # django.contrib.messages, skipped under /api/
    "portal.audit.AuditMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.sso.login_options",  # the single sign-on button on the login page
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------
DATABASE_URL = envstr("DATABASE_URL")
if not DATABASE_URL:
    from portal import embedded_db

    DATABASE_URL = embedded_db.ensure_running()
    os.environ["DATABASE_URL"] = DATABASE_URL  # children (daphne, agents, tests) share it
if not DATABASE_URL.startswith(("postgres://", "postgresql://")):
    raise ImproperlyConfigured("DATABASE_URL must be a postgresql:// URL (SQLite is not supported)")

# 0 by default: under ASGI (daphne) each request may run in its own thread, and
# persistent per-thread connections pile up until PostgreSQL refuses clients.
_db = dj_database_url.parse(DATABASE_URL, conn_max_age=envint("DB_CONN_MAX_AGE", 0, minimum=0))
_db["CONN_HEALTH_CHECKS"] = True
# A unix-socket URL (`?host=/path`) arrives as an option; make it the HOST so every
# consumer of these settings (channel layer, subprocess URLs) sees the same place.
for _key in ("host", "port"):
    if _key in _db.get("OPTIONS", {}):
        _db[_key.upper()] = str(_db["OPTIONS"].pop(_key))
_db.setdefault("OPTIONS", {})["application_name"] = envstr("PORTAL_PROCESS_NAME", "gpu-portal")
# lock_timeout: keep the scheduler lock and the hot paths from waiting forever on a stuck peer.
# jit=off: PostgreSQL compiles a statement whose estimated cost passes jit_above_cost, and the
# estimates of this project's report and admin statements (correlated subqueries, a year of
# allocation intervals) pass it while they run in milliseconds. Over a year's history the
# compilation was nearly all of their time: the usage report by tenant 511 -> 10 ms (month) and
# 763 -> 72 ms (year), the tenant admin list 1.9 -> 0.2 s; a bare scan of all 10 million
# intervals 687 against 708 ms (bench/HISTORY.md, Dec 2, fourth session).
_db["OPTIONS"].setdefault("options", "-c lock_timeout=30000 -c jit=off")
# A network cut to PostgreSQL must surface as an error within seconds (then every process
# reconnects by itself), not as a query hung for the kernel's 15-minute TCP timeout.
_TCP_CUT_OPTIONS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3,
                    "tcp_user_timeout": 20_000}
for _key, _value in _TCP_CUT_OPTIONS.items():
    _db["OPTIONS"].setdefault(_key, _value)
# Server-side prepared statements for the hot hand-written statements (kernel.prepared).
# Only kernel.prepared's cursors bind on the server; Django's own stay client-side bound,
# and those never prepare whatever this is set to. Off for PgBouncer in transaction mode
# before 1.21, which cannot carry a prepared statement from one transaction to the next.
if envbool("DB_PREPARED_STATEMENTS", True):
    _db["OPTIONS"].setdefault("prepare_threshold", 5)
# Web servers set DB_POOL_MAX_SIZE: a per-process pool of connections (Django's,
# psycopg_pool). Under ASGI each request runs in a thread of its own, so without a
# pool every request connects afresh (and PostgreSQL forks a backend for it).
_pool_max = envint("DB_POOL_MAX_SIZE", 0, minimum=0)
if _pool_max:
    _db["OPTIONS"]["pool"] = {"min_size": min(2, _pool_max), "max_size": _pool_max, "timeout": 30}
    _db["CONN_MAX_AGE"] = 0  # Django's pool refuses any other value
    # Pooled connections are checked by the socket, not by a query per request (kernel/postgres).
    _db["ENGINE"] = "kernel.postgres"
    _db["CONN_HEALTH_CHECKS"] = False
DATABASES = {"default": _db}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channels ----------------------------------------------------------------------
REDIS_URL = envstr("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    # channels_postgres needs a complete Django database settings dict.
    _layer_db = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db["NAME"],
        "USER": _db.get("USER", ""),
        "PASSWORD": _db.get("PASSWORD", ""),
        "HOST": _db.get("HOST", ""),
        "PORT": _db.get("PORT", ""),
        "OPTIONS": dict(_TCP_CUT_OPTIONS),
        "TIME_ZONE": None,
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": False,
        "AUTOCOMMIT": True,
        "ATOMIC_REQUESTS": False,
        "TEST": {},
    }
    CHANNEL_LAYERS = {
        "default": {
            # channels_postgres, reconnecting after a database restart (see the module).
            "BACKEND": "portal.channel_layer.PostgresChannelLayer",
            "CONFIG": _layer_db,
        }
    }
    # The layer removes a disconnected channel from its groups through the ORM with
    # `using("channels_postgres")`: without this alias every disconnect fails and the
    # dead channel stays in its group. In tests it mirrors the test database.
    DATABASES["channels_postgres"] = {**_layer_db, "TEST": {"MIRROR": "default"}}

# Live pages: a viewer gets at most one frame per this many ms (bursts are merged).
LIVE_MIN_INTERVAL_MS = envint("LIVE_MIN_INTERVAL_MS", 250, minimum=0)
# After-commit pushes leave from a background publisher thread, not the request
# thread (kernel.live); off only in the test process's in-memory channel layer.
LIVE_PUBLISH_IN_BACKGROUND = envbool("LIVE_PUBLISH_IN_BACKGROUND", True)
# The publisher sends at most one batch per this many ms (the first after a quiet spell at
# once): under a stream of commits each group gets one merged message per interval.
LIVE_PUBLISH_MIN_INTERVAL_MS = envint("LIVE_PUBLISH_MIN_INTERVAL_MS", 50, minimum=0)

# Alerts (server lost, GPU error, task OOM) are also POSTed here as JSON, after commit.
ALERT_WEBHOOK_URL = envstr("ALERT_WEBHOOK_URL")
# A pending task older than this raises a queue_wait alert (checked every minute; 0 = off).
ALERT_QUEUE_WAIT_S = envint("ALERT_QUEUE_WAIT_S", 900, minimum=0)

# --- django-q2 (ORM broker on the same PostgreSQL) --------------------------------
Q_CLUSTER = {
    "name": "gpu-portal",
    "orm": "default",
    "workers": envint("Q_WORKERS", 2, minimum=1),
    "timeout": 60,
    "retry": 120,
    "max_attempts": 1,
    "catch_up": False,
    "poll": 0.2,
    "ack_failures": True,
    "save_limit": 500,
    "sync": envbool("Q_SYNC", False),
}

# --- Auth, i18n, static --------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en"
# Chosen per request by the language switch (a cookie) or else the browser's Accept-Language.
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
# Compiled from the committed .po files by `make` (portal/i18n.py; no gettext tools needed).
LOCALE_PATHS = [Path(envstr("LOCALE_DIR", str(BASE_DIR / "locale")))]
TIME_ZONE = envstr("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(envstr("STATIC_ROOT", str(BASE_DIR / "staticfiles")))

# --- Security (production: PORTAL_PRODUCTION=true behind TLS) -------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if envbool("BEHIND_TLS_PROXY", False) else None
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = envbool("SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# --- The audit (django-pghistory; portal.audit) -----------------------------------------
# One searchable log of every audited change, with old -> new values and the context.
PGHISTORY_ADMIN_CLASS = "portal.admin.kernel.AuditEventsAdmin"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.api.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["portal.api.throttling.TokenBucketThrottle"],
    "DEFAULT_PAGINATION_CLASS": "portal.api.pagination.Pagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Duplicate keys, NUL, lone surrogates, NaN, deep nesting: 400, never stored (issue 9).
    # No multipart: the API takes no files, and daphne (Twisted) answers a malformed
    # multipart body itself with an empty 400 that no schema can describe.
    "DEFAULT_PARSER_CLASSES": ["portal.api.parsers.StrictJSONParser", "rest_framework.parsers.FormParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "GPU allocation portal API",
    "DESCRIPTION": "Submit and follow GPU tasks; see quotas, GPUs and the cluster. Auth: `Token api_...`.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from the installed sidecar package, not a CDN (portals often run offline).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Every error status with its body (issue 9): portal/api/schema.py.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "portal.api.schema.add_error_responses"],
    "ENUM_NAME_OVERRIDES": {
        "TaskStatusEnum": "scheduling.choices.TaskStatus",
        "ServerStatusEnum": "nodes.models.NodeStatus",
    },
}
# Users' API rate limit per token (token bucket, per web process): refill per second, and burst.
API_RATE_LIMIT = envint("API_RATE_LIMIT", 50, minimum=0)
API_RATE_BURST = envint("API_RATE_BURST", 200, minimum=1)
# Web processes register in the control-plane registry on their first request (portal.asgi).
REGISTRY_ENABLED = envbool("PORTAL_REGISTRY", True)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": envstr("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
    },
}

# --- Exposure and login throttling (README "Security model") --------------------------
# /metrics names tenants, GPU UUIDs and servers: a bearer token (Prometheus'
# `authorization: {credentials: ...}`) or a client address in the allow-list.
METRICS_TOKEN = envsecret("METRICS_TOKEN") or ""
try:
    METRICS_ALLOW_FROM = [ipaddress.ip_network(n, strict=False)
                          for n in envlist("METRICS_ALLOW_FROM", ["127.0.0.1/32", "::1/128"])]
except ValueError as exc:
    raise ImproperlyConfigured(f"METRICS_ALLOW_FROM: {exc}") from None
# django-axes: after LOGIN_FAILURE_LIMIT wrong passwords for one username from one
# address, that pair is locked out for LOGIN_LOCKOUT_MINUTES (admin and portal login).
INSTALLED_APPS += ["axes"]
MIDDLEWARE += ["axes.middleware.AxesMiddleware"]  # last, as axes requires
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = envint("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=envint("LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False  # no banner on every process start (management commands print to users)

# --- Scheduler policy (PORTAL_CONFIG YAML, seeds' defaults) ---------------------------
SCHEDULER = load_config(envstr("PORTAL_CONFIG"))

# Static files served by Django itself: for `make run` (a real deployment puts a
# web server or CDN in front and leaves this off).
SERVE_STATIC = envbool("SERVE_STATIC", DEBUG)

# --- GPU and tenant history (scheduling.history; issue 15) ---------------------------------
# Sampled from the database every HISTORY_SAMPLE_S by runscheduler (and by the every-minute
# sweep as a safety net), never on the heartbeat path; rolled up per minute and per hour.
HISTORY_SAMPLE_S = envint("HISTORY_SAMPLE_S", 10, minimum=1)
HISTORY_RAW_DAYS = envint("HISTORY_RAW_DAYS", 1, minimum=1)
HISTORY_MINUTE_DAYS = envint("HISTORY_MINUTE_DAYS", 30, minimum=1)
HISTORY_HOUR_DAYS = envint("HISTORY_HOUR_DAYS", 365, minimum=1)

# --- Single sign-on (portal.sso; issue 15) -----------------------------------------------
# Off unless configured. Local accounts (ModelBackend) always keep working beside them. SSO
# backends go just before ModelBackend: after any backend set earlier that must come first
# (a login throttle), whatever order the settings blocks are in.
_LOCAL_BACKEND = "django.contrib.auth.backends.ModelBackend"
AUTHENTICATION_BACKENDS = list(globals().get("AUTHENTICATION_BACKENDS", [_LOCAL_BACKEND]))
# Directory group -> "tenant:member" | "tenant:admin" | "staff" | "superuser" (JSON object).
from portal.sso_config import parse_group_map  # noqa: E402

SSO_GROUP_MAP = parse_group_map(envstr("SSO_GROUP_MAP"))

AUTH_LDAP_SERVER_URI = envstr("LDAP_SERVER_URI")  # e.g. ldaps://ldap.example.org
if AUTH_LDAP_SERVER_URI:
    import ldap
    from django_auth_ldap.config import GroupOfNamesType, LDAPSearch

    AUTH_LDAP_BIND_DN = envstr("LDAP_BIND_DN")
    AUTH_LDAP_BIND_PASSWORD = envsecret("LDAP_BIND_PASSWORD", "")
    AUTH_LDAP_USER_SEARCH = LDAPSearch(envstr("LDAP_USER_BASE"), ldap.SCOPE_SUBTREE,
                                       envstr("LDAP_USER_FILTER", "(uid=%(user)s)"))
    AUTH_LDAP_GROUP_SEARCH = LDAPSearch(envstr("LDAP_GROUP_BASE"), ldap.SCOPE_SUBTREE, "(objectClass=groupOfNames)")
    AUTH_LDAP_GROUP_TYPE = GroupOfNamesType(name_attr="cn")
    AUTH_LDAP_USER_ATTR_MAP = {"first_name": "givenName", "last_name": "sn", "email": "mail"}
    AUTH_LDAP_START_TLS = envbool("LDAP_START_TLS", False)
    AUTHENTICATION_BACKENDS.insert(AUTHENTICATION_BACKENDS.index(_LOCAL_BACKEND), "portal.sso.LDAPBackend")

OIDC_OP_ISSUER = envstr("OIDC_OP_ISSUER")  # e.g. https://sso.example.org/realms/lab
if OIDC_OP_ISSUER:
    INSTALLED_APPS.append("mozilla_django_oidc")
    OIDC_RP_CLIENT_ID = envstr("OIDC_RP_CLIENT_ID")
    OIDC_RP_CLIENT_SECRET = envsecret("OIDC_RP_CLIENT_SECRET", "")
    OIDC_RP_SIGN_ALGO = envstr("OIDC_RP_SIGN_ALGO", "RS256")
    OIDC_RP_SCOPES = "openid email profile groups"
    LOGIN_REDIRECT_URL_FAILURE = LOGIN_URL  # a refused sign-in goes back to the login page
    OIDC_OP_AUTHORIZATION_ENDPOINT = envstr("OIDC_OP_AUTHORIZATION_ENDPOINT", f"{OIDC_OP_ISSUER}/authorize")
    OIDC_OP_TOKEN_ENDPOINT = envstr("OIDC_OP_TOKEN_ENDPOINT", f"{OIDC_OP_ISSUER}/token")
    OIDC_OP_USER_ENDPOINT = envstr("OIDC_OP_USER_ENDPOINT", f"{OIDC_OP_ISSUER}/userinfo")
    OIDC_OP_JWKS_ENDPOINT = envstr("OIDC_OP_JWKS_ENDPOINT", f"{OIDC_OP_ISSUER}/jwks")
    AUTHENTICATION_BACKENDS.insert(AUTHENTICATION_BACKENDS.index(_LOCAL_BACKEND), "portal.sso.OIDCBackend")
