"""Allocations per GPU, rolled up with the usage ledger (``scheduling.usage.roll_up``), so that
``/metrics``'s ``gpu_tasks_total`` stops counting the whole allocation history on every scrape.

The counts start with every allocation already behind the usage watermark: taken under the
watermark row's lock, as ``roll_up`` takes it, so a roll-up running beside the migration counts
its intervals after this and none twice. Without a watermark row nothing was rolled up yet and
every interval is still read raw.
"""

import django.db.models.deletion
from django.db import migrations, models

# Kept here (not imported from scheduling.usage): a migration stays as it ran.
SEED_SQL = """
SELECT watermark FROM scheduling_usagerollup WHERE name = 'usage' FOR UPDATE;
INSERT INTO scheduling_gpuallocationcount (gpu_id, allocations)
SELECT a.gpu_id, count(*)
FROM scheduling_allocation a JOIN scheduling_usagerollup r ON r.name = 'usage'
WHERE a.released_at <= r.watermark
GROUP BY a.gpu_id;
"""


class Migration(migrations.Migration):

    dependencies = [
        ("nodes", "0009_gpu_id_node_key"),
        ("scheduling", "0017_count_tasks_up_to"),
    ]

    operations = [
        migrations.CreateModel(
            name="GpuAllocationCount",
            fields=[
                ("gpu", models.OneToOneField(db_constraint=False, on_delete=django.db.models.deletion.DO_NOTHING,
                                             primary_key=True, related_name="+", serialize=False, to="nodes.gpu")),
                ("allocations", models.BigIntegerField(default=0)),
            ],
        ),
        migrations.RunSQL(SEED_SQL, reverse_sql=migrations.RunSQL.noop),
    ]
