from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from scheduling import task_fields
from scheduling.choices import TaskStatus
from scheduling.models import Task, TaskEvent
from scheduling.reasons import translate_reason
from tenants.choices import Priority


class TaskSerializer(serializers.ModelSerializer):
    tenant = serializers.CharField(source="tenant.slug")
    submitter = serializers.CharField(source="submitter.username", default=None, allow_null=True)
    priority = serializers.CharField(source="get_priority_display")
    server = serializers.CharField(source="node.name", default=None, allow_null=True)
    array_id = serializers.IntegerField(allow_null=True)

    class Meta:
        model = Task
        fields = ["id", "name", "tenant", "submitter", "status", "pending_reason", "queue_position", "priority",
                  "workload_class", "gpu_count", "gpu_memory_mb", "share_mode", "model_name", "gpu_model",
                  "node_selector", "nodes", "gpus_per_node", "topology_key", "array_id", "array_index",
                  "timeout_s", "command", "env", "working_dir", "server", "exit_code",
                  "failure_reason", "oom", "attempt", "max_retries", "created_at", "assigned_at", "started_at",
                  "finished_at"]
        read_only_fields = fields

    def to_representation(self, task: Task) -> dict:
        # Hand-built: the same fields as declared above, without DRF's per-field
        # machinery (a submit's response and a 500-row page are on hot paths).
        def iso(value):
            return value.isoformat().replace("+00:00", "Z") if value is not None else None

        return {
            "id": task.pk, "name": task.name, "tenant": task.tenant.slug,
            "submitter": task.submitter.username if task.submitter_id else None,
            # Reasons in the caller's language (Accept-Language; English as stored otherwise).
            "status": task.status, "pending_reason": translate_reason(task.pending_reason),
            "queue_position": task.queue_position,
            "priority": Priority(task.priority).label, "workload_class": task.workload_class,
            "gpu_count": task.gpu_count, "gpu_memory_mb": task.gpu_memory_mb, "share_mode": task.share_mode,
            "model_name": task.model_name, "gpu_model": task.gpu_model, "node_selector": task.node_selector,
            "nodes": task.nodes, "gpus_per_node": task.gpus_per_node, "topology_key": task.topology_key,
            "array_id": task.array_id, "array_index": task.array_index,
            "timeout_s": task.timeout_s, "command": task.command, "env": task.env, "working_dir": task.working_dir,
            "server": task.node.name if task.node_id else None, "exit_code": task.exit_code,
            "failure_reason": translate_reason(task.failure_reason), "oom": task.oom, "attempt": task.attempt,
            "max_retries": task.max_retries, "created_at": iso(task.created_at), "assigned_at": iso(task.assigned_at),
            "started_at": iso(task.started_at), "finished_at": iso(task.finished_at),
        }


class TaskRankSerializer(serializers.Serializer):
    rank = serializers.IntegerField()
    server = serializers.CharField()
    ready_at = serializers.DateTimeField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    exit_code = serializers.IntegerField(allow_null=True)


class TaskDetailSerializer(TaskSerializer):
    gpus = serializers.SerializerMethodField()
    ranks = serializers.SerializerMethodField()
    dependency = serializers.SerializerMethodField()

    class Meta(TaskSerializer.Meta):
        fields = [*TaskSerializer.Meta.fields, "gpus", "ranks", "master_addr", "master_port", "dependency"]
        read_only_fields = fields

    def to_representation(self, task: Task) -> dict:
        return {**super().to_representation(task), "gpus": self.get_gpus(task), "ranks": self.get_ranks(task),
                "master_addr": task.master_addr or None, "master_port": task.master_port,
                "dependency": self.get_dependency(task)}

    @extend_schema_field(serializers.DictField(child=serializers.ListField(child=serializers.IntegerField())))
    def get_dependency(self, task: Task) -> dict[str, list[int]]:
        """What it waits for, e.g. {"after_ok": [12, 13]}."""
        out: dict[str, list[int]] = {}
        for kind, other in task.dependencies.order_by("depends_on_id").values_list("kind", "depends_on_id"):
            out.setdefault(kind, []).append(other)
        return out

    @extend_schema_field(TaskRankSerializer(many=True))
    def get_ranks(self, task: Task) -> list[dict]:
        """A gang's servers for its current attempt, rank 0 first (empty for a one-server task)."""
        return [{"rank": r.rank, "server": r.node.name, "ready_at": r.ready_at, "started_at": r.started_at,
                 "finished_at": r.finished_at, "exit_code": r.exit_code} for r in task.current_ranks()]

    def get_gpus(self, task: Task) -> list[str]:
        """The GPUs it holds now, as server:index."""
        return [f"{a.node.name}:{a.gpu.index}" for a in
                task.allocations.filter(released_at__isnull=True).select_related("node", "gpu").order_by("gpu_id")]


def _submit_field(spec: task_fields.TaskField) -> serializers.Field:
    """The schema's description of one submit field, from its declaration."""
    common: dict = {"required": spec.required}
    if spec.help:
        common["help_text"] = spec.help
    if spec.default is not None:
        common["default"] = spec.default
    if spec.kind in (task_fields.TEXT, task_fields.COMMAND, task_fields.ARRAY):
        return serializers.CharField(max_length=spec.max_chars, **common)
    if spec.kind in (task_fields.TENANT, task_fields.RESERVATION):
        return serializers.CharField(**common)
    if spec.kind == task_fields.INTEGER:
        return serializers.IntegerField(min_value=spec.min_value, allow_null=spec.nullable, **common)
    if spec.kind == task_fields.CHOICE:
        return serializers.ChoiceField(spec.choices, **common)
    if spec.kind == task_fields.MAPPING:
        return serializers.DictField(child=serializers.CharField(), **common)
    if spec.kind == task_fields.DEPENDENCY:
        return serializers.JSONField(**common)
    raise ValueError(f"no schema for {spec.kind!r} ({spec.name})")  # pragma: no cover - a new kind


class TaskSubmitSerializer(serializers.Serializer):
    """What a submit accepts (for the schema): checked by ``scheduling.submission.validate``."""

    # Built from the field table (scheduling.task_fields); validate gives the field messages.

    def get_fields(self) -> dict[str, serializers.Field]:
        return {spec.name: _submit_field(spec) for spec in task_fields.SPECS}


class BatchSubmitSerializer(serializers.Serializer):
    tasks = TaskSubmitSerializer(many=True, help_text=f"1 to {task_fields.BATCH_MAX_TASKS} tasks, all or none.")


class BatchResultSerializer(serializers.Serializer):
    ids = serializers.ListField(child=serializers.IntegerField())
    count = serializers.IntegerField()


class TaskEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = TaskEvent
        fields = ["id", "from_status", "to_status", "actor", "reason", "created_at"]


class TaskLogSerializer(serializers.Serializer):
    task = serializers.IntegerField()
    attempt = serializers.IntegerField()
    offset = serializers.IntegerField(help_text="Byte offset of the first byte of data.")
    next_offset = serializers.IntegerField(help_text="Ask from here for more.")
    data = serializers.CharField()
    final = serializers.BooleanField(help_text="The task has ended: no more output will come.")


class PreviewSerializer(serializers.Serializer):
    fits = serializers.BooleanField()
    message = serializers.CharField()
    server = serializers.CharField(allow_null=True)
    gpus = serializers.ListField(child=serializers.CharField())
    queue_position = serializers.IntegerField(allow_null=True)


class TaskArraySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    tenant = serializers.CharField(source="tenant.slug")
    submitter = serializers.CharField(source="submitter.username", default=None)
    spec = serializers.CharField()
    size = serializers.IntegerField()
    throttle = serializers.IntegerField(help_text="Most elements running at once; 0: no limit.")
    created_at = serializers.DateTimeField()
    counts = serializers.SerializerMethodField()

    @extend_schema_field(serializers.DictField(child=serializers.IntegerField()))
    def get_counts(self, array) -> dict[str, int]:
        """Elements by state (only the states that have some)."""
        return {state: getattr(array, f"n_{state}") for state in TaskStatus.values if getattr(array, f"n_{state}")}
