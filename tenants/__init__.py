"""Tenants, memberships, quotas (with fair share and temporary grants) and API tokens; the
classes quotas are written in (``choices``: priority, workload class). Live usage against a
quota is computed above, in ``scheduling.quotas``, which sees tasks."""
