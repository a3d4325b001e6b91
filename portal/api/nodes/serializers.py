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


# --- the heartbeat's fast path -------------------------------------------------------------
# An agent sends the same well-formed report every few seconds; DRF's nested validation of
# its GPU list cost ~1.3 ms of CPU per heartbeat (8 GPUs), most of the request's own work.
# ``canonical_heartbeat`` accepts only a report that is exactly well formed (plain JSON
# types, strings already trimmed and ASCII, every bound and rule of the serializers above
# met) and returns what ``HeartbeatSerializer`` would; anything else returns None, and the
# view runs the serializer, whose 400 names the fields. So no input is accepted here that
# the serializer would refuse, and every refusal still comes from the serializer.

def _text(value, max_length: int, *, blank: bool = False) -> bool:
    return (type(value) is str and len(value) <= max_length and (blank or value != "") and value.isascii()
            and value == value.strip() and "\x00" not in value)


def _int(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


_GPU_INTS = (("index", 0, MAX_GPUS_PER_SERVER - 1), ("memory_total_mb", 1, MAX_MEMORY_MB),
             ("memory_used_mb", 0, MAX_MEMORY_MB), ("utilization_pct", 0, 100),
             ("temperature_c", 0, MAX_TEMPERATURE_C), ("power_w", 0, MAX_POWER_W))
_GPU_KEYS = frozenset(("index", "uuid", "name", "memory_total_mb", "memory_used_mb", "utilization_pct",
                       "temperature_c", "power_w", "ecc_errors", "retired_pages", "retired_pages_pending",
                       "xid_errors", "processes", "loaded_models"))


def _canonical_gpu(gpu) -> dict | None:
    if type(gpu) is not dict:
        return None
    for key, low, high in _GPU_INTS:
        if not _int(gpu.get(key), low, high):
            return None
    if not (_text(gpu.get("uuid"), 64) and _text(gpu.get("name"), 100)):
        return None
    ecc, retired = gpu.get("ecc_errors", 0), gpu.get("retired_pages", 0)
    pending, xids = gpu.get("retired_pages_pending", False), gpu.get("xid_errors", [])
    processes, models = gpu.get("processes", []), gpu.get("loaded_models", [])
    if not (_int(ecc, 0, INT64_MAX) and _int(retired, 0, INT32_MAX) and type(pending) is bool
            and type(xids) is list and len(xids) <= 64 and all(_int(x, 0, INT32_MAX) for x in xids)
            and type(processes) is list and len(processes) <= 1024
            and type(models) is list and len(models) <= 16 and all(_text(m, 200) for m in models)):
        return None
    total = gpu["memory_total_mb"]
    if gpu["memory_used_mb"] > total:
        return None
    procs = []
    for p in processes:
        if type(p) is not dict or not _int(p.get("pid"), 0, MAX_PID):
            return None
        used = p.get("used_memory_mb")
        if used is not None and not _int(used, 0, MAX_MEMORY_MB):
            return None
        procs.append({"pid": p["pid"], "used_memory_mb": used})
    if sum(p["used_memory_mb"] or 0 for p in procs) > total:
        return None
    out = {key: gpu[key] for key in _GPU_KEYS if key in gpu}
    out.update(ecc_errors=ecc, retired_pages=retired, retired_pages_pending=pending, xid_errors=list(xids),
               processes=procs, loaded_models=list(models))
    return out


def canonical_heartbeat(data, node) -> dict | None:
    """``HeartbeatSerializer(data, context={"node": node}).validated_data`` for an exactly
    well-formed report; None for anything else (then ask the serializer)."""
    if type(data) is not dict:
        return None
    out: dict = {}
    if "name" in data:
        if not _text(data["name"], 100) or data["name"] != node.name:
            return None
        out["name"] = data["name"]
    for key, max_length in (("hostname", 255), ("agent_version", 50)):
        if key in data:
            if not _text(data[key], max_length, blank=True):
                return None
            out[key] = data[key]
    gpus = data.get("gpus")
    if type(gpus) is not list or len(gpus) > MAX_GPUS_PER_SERVER:
        return None
    checked = []
    for gpu in gpus:
        gpu = _canonical_gpu(gpu)
        if gpu is None:
            return None
        checked.append(gpu)
    if len({g["index"] for g in checked}) != len(checked) or len({g["uuid"] for g in checked}) != len(checked):
        return None
    out["gpus"] = checked
    return out
