"""The admin site: one module per app's models, all here in the web shell (they read
across apps: a GPU's page shows the task holding it, a tenant's list its live usage)."""

from portal.admin import kernel, nodes, scheduling, tenants  # noqa: F401  (each registers its ModelAdmins)
