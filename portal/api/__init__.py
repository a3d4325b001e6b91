"""Every REST interface: ``/api/v1/`` for users and tools (``scheduling``: tasks, usage,
reservations; ``nodes``: the GPU inventory; ``tenants``: quotas, grants, tokens) and
``/api/agent/v1/`` for the GPU servers' agents (``nodes.urls``: enrolment, heartbeats,
assignments, task events and logs). Views validate and call the apps' services
(``scheduling.submission``, ``scheduling.lifecycle``, ``nodes.heartbeat``, ...)."""
