"""The project package, on top of the apps (``kernel`` < ``tenants`` < ``nodes`` <
``scheduling`` < ``portal``; the import-linter contract in ``pyproject.toml``).

Settings (``settings``, ``config``, ``env``, ``embedded_db``), URLs and ASGI/websocket
routing (``urls``, ``page_urls``, ``asgi``, ``routing``), the web shell that reads across the
apps: the portal pages (``views``), every REST API (``portal.api``: users' API per app and
the agents' API), every admin page (``portal.admin``, ``admin_views``), websocket consumers
(``consumers``, ``agent_consumers``), ``/metrics`` (``metrics``), sign-on (``sso``) and the
live grid's figures (``livedata``). Nothing below imports it.
"""
