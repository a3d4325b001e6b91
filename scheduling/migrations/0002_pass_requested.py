from django.db import migrations, models


def create_wake_row(apps, schema_editor):
    apps.get_model("scheduling", "SchedulerLock").objects.get_or_create(name="wake")


class Migration(migrations.Migration):

    dependencies = [
        ("scheduling", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="schedulerlock",
            name="pass_requested",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="schedulerlock",
            name="requested_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(create_wake_row, migrations.RunPython.noop),
    ]
