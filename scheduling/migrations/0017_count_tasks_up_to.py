"""``scheduling_count_tasks_up_to(tenant, status, n)``: a tenant's tasks in a status, counted up
to ``n``, for the submit's pending-limit check (``lifecycle._INSERT_WITH_EVENTS``).

The count was a subquery of the submit's statement. The statement is prepared, and PostgreSQL
plans a prepared statement for its values five times, then keeps one generic plan only if that
does not look dearer than those. The subquery's estimate made it look dearer whenever the
tenant's statistics showed few pending tasks (planned for the values, the count looked nearly
free; generically, thousands of rows), so every submit was planned afresh: 0.55 ms of the
server's CPU, more than running it, with 300,000 tasks in the table. Behind a function the
count costs the planner the same either way, and is only planned when a submit runs it (near
the limit). STABLE: it reads with the calling statement's snapshot, so, as the subquery did,
it sees neither tasks committed after the statement began nor the ones the statement inserts.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("scheduling", "0016_task_rows_room_for_in_place_updates")]

    operations = [
        migrations.RunSQL(
            """
            CREATE FUNCTION scheduling_count_tasks_up_to(tenant bigint, in_status text, n bigint)
            RETURNS bigint LANGUAGE sql STABLE PARALLEL SAFE AS $$
                -- $1, $2, $3 rather than the names: a column of the same name would take precedence.
                SELECT count(*) FROM (
                    SELECT 1 FROM scheduling_task t WHERE t.tenant_id = $1 AND t.status = $2 LIMIT $3
                ) AS bounded
            $$;
            """,
            "DROP FUNCTION scheduling_count_tasks_up_to(bigint, text, bigint);",
        ),
    ]
