"""Leave a fifth of each task-table page free (fillfactor 80), so that a pass can rewrite the
waiting tasks' reasons and queue positions in place.

A pass stores each waiting task's position, so one task entering or leaving the queue ahead of
the others rewrites every row behind it. Neither column is indexed, so PostgreSQL can write the
new version on the same page without touching the table's five indexes (a HOT update), but only
where the page has room; at the default fillfactor of 100 a busy queue's pages have none between
autovacuums, and each rewritten row became a new tuple on another page plus five index entries.
Measured at 1,600 GPUs with 1,193 tasks waiting, a pass after one task entered or left ahead of
them (medians of 16, separate processes alternating): 74.6-86.1 ms and 52-60 ms of PostgreSQL's
CPU at 100; 61.3-62.5 ms and 40-43 ms at 90; 57.7-60.2 ms and 31 ms at 80; against 33-39 ms
and 15-17 ms when nothing moved. Placements change ``status`` (indexed), so they are never HOT
and gain nothing from it (a pass from empty measured the same at 85 and 100).

The cost is the free fifth on pages whose tasks have finished and are never updated again. Only
pages written from now on are filled to 80%: rewriting the existing ones would lock the table
for as long as it takes to copy its history.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("scheduling", "0015_pending_bound")]

    operations = [
        migrations.RunSQL(
            "ALTER TABLE scheduling_task SET (fillfactor = 80);",
            "ALTER TABLE scheduling_task RESET (fillfactor);",
        ),
    ]
