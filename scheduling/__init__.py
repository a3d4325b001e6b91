"""Tasks and their placement: the top domain app, which sees tenants and nodes.

- the task and its life: ``models``, ``choices``, ``task_fields`` (a task's fields declared
  once), ``submission`` (validation and the atomic insert), ``lifecycle`` (every transition
  and its after-commit fan-out), ``access`` (who sees which tasks), ``filters``;
- placing it: ``placement/`` (the pure placement core), ``passes`` (snapshot, decide, apply
  under ``lock``), ``triggers`` (wake-ups), ``sweep`` (lost servers, time-outs),
  ``assignments`` (what each agent should run), ``preview`` and ``whatif``;
- jobs beyond one task: ``arrays``, ``dependencies``, gangs (in ``lifecycle``/``passes``);
- planning and accounting: ``reservations``, ``calendar``, ``grants``, ``quotas`` (limits
  beside live usage), ``usage`` (the ledger and fair share), ``history`` (GPU/tenant
  samples), ``queue_wait`` (the queue-wait alert), ``logs``, ``reasons``.
"""
