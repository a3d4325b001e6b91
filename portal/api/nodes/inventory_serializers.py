from __future__ import annotations

from rest_framework import serializers

from nodes import inventory
from nodes.models import GPU, Node


class GPUSerializer(serializers.ModelSerializer):
    server = serializers.CharField(source="node.name")
    state = serializers.SerializerMethodField()
    memory_free_mb = serializers.IntegerField()

    class Meta:
        model = GPU
        fields = ["id", "server", "index", "uuid", "model_name", "state", "memory_total_mb", "memory_used_mb",
                  "memory_free_mb", "utilization_pct", "temperature_c", "power_w", "health", "cordoned",
                  "cordon_reason", "loaded_models"]

    def get_state(self, gpu: GPU) -> str:
        return inventory.state_of(gpu)

    def to_representation(self, gpu: GPU) -> dict:
        data = super().to_representation(gpu)
        visible = self.context.get("visible_models")  # None: staff, who see every model
        if visible is not None:
            data["loaded_models"] = {k: v for k, v in (data["loaded_models"] or {}).items() if k in visible}
        return data


class ServerGPUSerializer(GPUSerializer):
    class Meta(GPUSerializer.Meta):
        fields = [f for f in GPUSerializer.Meta.fields if f != "server"]


class ServerSerializer(serializers.ModelSerializer):
    gpus = ServerGPUSerializer(many=True, read_only=True)
    heartbeat_overdue = serializers.BooleanField()
    load = serializers.SerializerMethodField()

    class Meta:
        model = Node
        fields = ["id", "name", "hostname", "status", "status_reason", "labels", "last_heartbeat_at",
                  "heartbeat_overdue", "agent_version", "load", "gpus"]

    def get_load(self, node: Node) -> dict:
        load = inventory.node_load(node)
        return {"allocated_gpus": load.allocated_gpus, "total_gpus": load.total_gpus,
                "mean_utilization_pct": load.mean_utilization_pct, "load_score": load.load_score}
