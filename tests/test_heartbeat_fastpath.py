"""The heartbeat's fast path (serializers.canonical_heartbeat) accepts nothing the serializer
refuses and returns exactly what the serializer would; everything else goes to the serializer."""

from __future__ import annotations

import copy
import json
import random

from portal.api.nodes.serializers import HeartbeatSerializer, canonical_heartbeat


class _Node:
    name = "gpu-01"


NODE = _Node()


def report(gpus: int = 2, **top) -> dict:
    return {"name": "gpu-01", "agent_version": "1.0", "hostname": "gpu-01.lab", **top, "gpus": [
        {"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81_559,
         "memory_used_mb": 1_000 * i, "utilization_pct": 10 * i, "temperature_c": 40 + i, "power_w": 300,
         "ecc_errors": 0, "retired_pages": 0, "xid_errors": [79] if i else [], "loaded_models": ["llama"],
         "processes": [{"pid": 100 + i, "used_memory_mb": 500}, {"pid": 7}]}
        for i in range(gpus)]}


def serializer_says(data) -> dict | None:
    s = HeartbeatSerializer(data=copy.deepcopy(data), context={"node": NODE})
    return json.loads(json.dumps(s.validated_data)) if s.is_valid() else None


def test_a_well_formed_report_gives_what_the_serializer_gives():
    for data in (report(), report(0), report(8), {"gpus": report()["gpus"]},
                 {"gpus": [{k: v for k, v in report(1)["gpus"][0].items()
                            if k not in ("ecc_errors", "retired_pages", "xid_errors", "processes", "loaded_models")}]}):
        fast = canonical_heartbeat(copy.deepcopy(data), NODE)
        assert fast is not None
        assert json.loads(json.dumps(fast)) == serializer_says(data)


def test_anything_else_is_left_to_the_serializer():
    gpu = report(1)["gpus"][0]
    for bad in ([], "x", None, {**report(), "name": "other"}, {**report(), "name": ""}, {"name": "gpu-01"},
                {"gpus": [gpu, gpu]}, {"gpus": [{**gpu, "memory_used_mb": 90_000}]},
                {"gpus": [{**gpu, "processes": [{"pid": 1, "used_memory_mb": 80_000}] * 2}]},
                {"gpus": [{**gpu, "index": True}]}, {"gpus": [{**gpu, "uuid": " GPU-0"}]},
                {"gpus": [{**gpu, "index": "0"}]}, {"gpus": [{**gpu, "name": "H100\x00"}]}):
        assert canonical_heartbeat(bad, NODE) is None


# Values a field may be replaced by: wrong types, bounds, blanks, nesting.
_ODD = [None, True, False, 0, -1, 1, 63, 64, 100, 101, 2**31, 2**63, 1.5, 2.0, "", " ", "5", "a" * 201, "ü", [],
        [1], [-1], ["x"], {}, {"pid": 1}, [{"pid": -1}], [{"pid": 1, "used_memory_mb": None}], "gpu-01"]


def test_fuzzed_reports_never_pass_the_fast_path_unless_the_serializer_agrees():
    rng = random.Random(14)
    base = report(3)
    accepted = 0
    for _ in range(1500):
        data = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.3:
                data[rng.choice(["name", "hostname", "agent_version", "gpus", "extra"])] = rng.choice(_ODD)
                continue
            gpus = data.get("gpus")
            if not isinstance(gpus, list) or not gpus or not isinstance(gpus[0], dict):
                continue
            gpu = rng.choice(gpus)
            key = rng.choice([*sorted(base["gpus"][0]), "retired_pages_pending", "unknown"])
            if key == "processes" and rng.random() < 0.5:
                gpu[key] = [{"pid": rng.choice(_ODD), "used_memory_mb": rng.choice(_ODD)}]
            elif rng.random() < 0.2:
                gpu.pop(key, None)
            else:
                gpu[key] = rng.choice(_ODD)
        fast = canonical_heartbeat(copy.deepcopy(data), NODE)
        if fast is not None:
            accepted += 1
            assert json.loads(json.dumps(fast)) == serializer_says(data), data
    assert accepted > 50  # the fuzzing also reaches reports the fast path takes
