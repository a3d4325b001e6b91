"""A GPU inventory generation: a number that changes, in the same transaction, whenever a GPU
is added or removed, moves to another server or reports another memory size: whatever can
change the cluster's limits (the most GPUs on one server, the largest GPU, the servers with
GPUs) that every submit is checked against.

Every submit used to aggregate all GPU rows for those limits: at 1,000 servers x 8 GPUs that
was 2.5 ms of PostgreSQL's CPU per submit. Web processes now keep the limits for as long as
this number is unchanged (``scheduling.submission``), reading one row instead. Triggers rather
than Python hooks, as for the credentials generation (kernel migration 0004): a GPU added by
a heartbeat, the admin, a shell or a raw statement counts the same. Heartbeats rewrite
``memory_total_mb`` every time, so updates count only when a value really changed. The value
comes from a sequence, so a number once used (even by a rolled-back transaction) never
comes back.
"""

from django.db import migrations

FORWARD = """
CREATE SEQUENCE nodes_gpu_inventory_generation_seq;
CREATE TABLE nodes_gpu_inventory_generation (
    id smallint PRIMARY KEY CHECK (id = 1),
    value bigint NOT NULL
);
INSERT INTO nodes_gpu_inventory_generation (id, value) VALUES (1, nextval('nodes_gpu_inventory_generation_seq'));

CREATE FUNCTION nodes_bump_gpu_inventory_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO nodes_gpu_inventory_generation (id, value) VALUES (1, nextval('nodes_gpu_inventory_generation_seq'))
    ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value;
    RETURN NULL;
END
$$;

CREATE TRIGGER gpu_inventory_added_or_removed AFTER INSERT OR DELETE OR TRUNCATE ON nodes_gpu FOR EACH STATEMENT
    EXECUTE FUNCTION nodes_bump_gpu_inventory_generation();
CREATE TRIGGER gpu_inventory_changed AFTER UPDATE ON nodes_gpu FOR EACH ROW
    WHEN (OLD.memory_total_mb IS DISTINCT FROM NEW.memory_total_mb OR OLD.node_id IS DISTINCT FROM NEW.node_id)
    EXECUTE FUNCTION nodes_bump_gpu_inventory_generation();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS gpu_inventory_added_or_removed ON nodes_gpu;
DROP TRIGGER IF EXISTS gpu_inventory_changed ON nodes_gpu;
DROP FUNCTION IF EXISTS nodes_bump_gpu_inventory_generation();
DROP TABLE IF EXISTS nodes_gpu_inventory_generation;
DROP SEQUENCE IF EXISTS nodes_gpu_inventory_generation_seq;
"""


class Migration(migrations.Migration):
    dependencies = [("nodes", "0007_node_rows_sparse_for_key_checks")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
