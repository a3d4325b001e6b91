"""Store server rows sparse (fillfactor 10) so that foreign-key checks against them use the
primary key.

Every placement checks its task's, its allocations' (and a gang's ranks') ``node_id``: at 1,600
GPUs on 200 servers, ~2,400 checks per pass from empty. PostgreSQL plans each check as
``SELECT 1 FROM ONLY nodes_node x WHERE id = $1 FOR KEY SHARE OF x`` and, on a table of a few
pages, a sequential scan of every server row costs less in its model than the primary-key index:
each check then read all 200 rows (and every dead version heartbeats leave behind). Those checks
cannot be hinted; rows stored ten times sparser make the index the cheaper plan from ~50
servers on (measured: 9.5 ms of the ~74 ms of backend CPU the 807 placements' writes
and checks took). The rows are few, so the space is nothing; CLUSTER rewrites the existing rows
at the new fill factor (and is then forgotten: nothing should re-cluster it).
"""

from django.db import migrations

FORWARD = """
ALTER TABLE nodes_node SET (fillfactor = 10);
CLUSTER nodes_node USING nodes_node_pkey;
ALTER TABLE nodes_node SET WITHOUT CLUSTER;
ANALYZE nodes_node;
"""

BACKWARD = "ALTER TABLE nodes_node RESET (fillfactor);"


class Migration(migrations.Migration):
    dependencies = [("nodes", "0006_after_wave_two_merge")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
