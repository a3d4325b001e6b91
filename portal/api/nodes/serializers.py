"""Payloads of the agent API. Every field is checked; a bad one is a 400 naming it."""

from __future__ import annotations

from django.core.validators import RegexValidator
from rest_framework import serializers

MAX_GPUS_PER_SERVER = 64
# Physical bounds of what a GPU can report (and what the columns hold): anything
# outside them is a broken or forged report, refused whole, never stored.
MAX_MEMORY_MB = 10_000_000  # 10 TB
MAX_TEMPERATURE_C = 150  # GPUs shut down near 100 C
MAX_POWER_W = 5_000
MAX_PID = 4_194_304  # Linux pid_max limit
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_LOG_CHUNK_CHARS = 65_536
MAX_LOG_CHUNKS_PER_REQUEST = 64

server_name = RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                             "letters, digits, '.', '_' and '-' only (at most 100), starting with a letter or digit")


class RegisterSerializer(serializers.Serializer):
    join_token = serializers.CharField(max_length=200)
    name = serializers.CharField(max_length=100, validators=[server_name])
    hostname = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    agent_version = serializers.CharField(max_length=50, required=False, allow_blank=True, default="")


class ProcessSerializer(serializers.Serializer):
    pid = serializers.IntegerField(min_value=0, max_value=MAX_PID)
    used_memory_mb = serializers.IntegerField(min_value=0, max_value=MAX_MEMORY_MB, required=False,
                                              allow_null=True, default=None)


class GPUReportSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0, max_value=MAX_GPUS_PER_SERVER - 1)
    uuid = serializers.CharField(max_length=64)
    name = serializers.CharField(max_length=100)
    memory_total_mb = serializers.IntegerField(min_value=1, max_value=MAX_MEMORY_MB)
    memory_used_mb = serializers.IntegerField(min_value=0, max_value=MAX_MEMORY_MB)
    utilization_pct = serializers.IntegerField(min_value=0, max_value=100)
    temperature_c = serializers.IntegerField(min_value=0, max_value=MAX_TEMPERATURE_C)
    power_w = serializers.IntegerField(min_value=0, max_value=MAX_POWER_W)
    ecc_errors = serializers.IntegerField(min_value=0, max_value=INT64_MAX, required=False, default=0)
    retired_pages = serializers.IntegerField(min_value=0, max_value=INT32_MAX, required=False, default=0)
    retired_pages_pending = serializers.BooleanField(required=False, default=False)
    xid_errors = serializers.ListField(child=serializers.IntegerField(min_value=0, max_value=INT32_MAX),
                                       max_length=64, required=False, default=list)
    processes = ProcessSerializer(many=True, required=False, default=list, max_length=1024)
    # Models the agent sees loaded on this GPU (e.g. from an inference server): affinity data.
    loaded_models = serializers.ListField(child=serializers.CharField(max_length=200), max_length=16,
                                          required=False, default=list)

    def validate(self, gpu: dict) -> dict:
        if gpu["memory_used_mb"] > gpu["memory_total_mb"]:
            raise serializers.ValidationError(
                {"memory_used_mb": [f"{gpu['memory_used_mb']} MB used is more than the {gpu['memory_total_mb']} "
                                    "MB the GPU has"]})
        used_by_processes = sum(p["used_memory_mb"] or 0 for p in gpu["processes"])
        if used_by_processes > gpu["memory_total_mb"]:
            raise serializers.ValidationError(
                {"processes": [f"processes use {used_by_processes} MB, more than the GPU has"]})
        return gpu


class HeartbeatSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False)
    hostname = serializers.CharField(max_length=255, required=False, allow_blank=True)
    agent_version = serializers.CharField(max_length=50, required=False, allow_blank=True)
    gpus = GPUReportSerializer(many=True, max_length=MAX_GPUS_PER_SERVER)

    def validate_gpus(self, gpus: list[dict]) -> list[dict]:
        for key in ("index", "uuid"):
            seen = [g[key] for g in gpus]
            duplicates = sorted({str(v) for v in seen if seen.count(v) > 1})
            if duplicates:
                raise serializers.ValidationError(f"GPU {key} reported twice: {', '.join(duplicates)}")
        return gpus

    def validate_name(self, name: str) -> str:
        node = self.context["node"]
        if name != node.name:
            raise serializers.ValidationError(f"this node token belongs to server {node.name!r}, not {name!r}")
        return name


class TaskEventSerializer(serializers.Serializer):
    # "ready": a gang's rank reached the start barrier (rank 0 gives its address and port).
    event = serializers.ChoiceField(choices=["ready", "started", "finished"])
    attempt = serializers.IntegerField(min_value=0, max_value=INT32_MAX)
    rank = serializers.IntegerField(min_value=0, max_value=32767, required=False, allow_null=True, default=None)
    address = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    port = serializers.IntegerField(min_value=1, max_value=65535, required=False, allow_null=True, default=None)
    exit_code = serializers.IntegerField(required=False, allow_null=True, default=None,
                                         min_value=-(2**31), max_value=2**31 - 1)
    oom = serializers.BooleanField(required=False, default=False)
    timed_out = serializers.BooleanField(required=False, default=False)
    lost = serializers.BooleanField(required=False, default=False)
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    duration_s = serializers.FloatField(min_value=0, required=False, allow_null=True, default=None)


class LogChunkSerializer(serializers.Serializer):
    attempt = serializers.IntegerField(min_value=0, max_value=INT32_MAX)
    rank = serializers.IntegerField(min_value=0, max_value=32767, required=False, default=0)
    offset = serializers.IntegerField(min_value=0, max_value=INT64_MAX - 4 * MAX_LOG_CHUNK_CHARS)
    data = serializers.CharField(max_length=MAX_LOG_CHUNK_CHARS, trim_whitespace=False)


class LogChunksSerializer(serializers.Serializer):
    chunks = LogChunkSerializer(many=True, max_length=MAX_LOG_CHUNKS_PER_REQUEST, allow_empty=False)
