from __future__ import annotations

from rest_framework import serializers


class QuotaLimitsSerializer(serializers.Serializer):
    max_gpus = serializers.IntegerField()
    max_gpu_memory_mb = serializers.IntegerField()
    max_running_tasks = serializers.IntegerField()
    max_pending_tasks = serializers.IntegerField()
    max_priority = serializers.CharField()
    allowed_classes = serializers.ListField(child=serializers.CharField())


class UsageSerializer(serializers.Serializer):
    gpus = serializers.IntegerField()
    gpu_memory_mb = serializers.IntegerField()
    running_tasks = serializers.IntegerField()
    pending_tasks = serializers.IntegerField()


class FairShareSerializer(serializers.Serializer):
    factor = serializers.FloatField(help_text="2^(-usage/share) in [0, 1]: 0.5 means exactly its share used.")
    usage = serializers.FloatField(help_text="Fraction of all tenants' decayed GPU-seconds.")
    share = serializers.FloatField(help_text="Fraction of all tenants' fair-share weights.")
    computed_at = serializers.DateTimeField()


class GrantSummarySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    extra_gpus = serializers.IntegerField()
    extra_gpu_memory_mb = serializers.IntegerField()
    extra_running_tasks = serializers.IntegerField()
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    reason = serializers.CharField()
    state = serializers.CharField(help_text="requested, approved or rejected.")
    status = serializers.CharField(help_text="requested, rejected, upcoming, active or expired.")
    text = serializers.CharField()
    requested_by = serializers.CharField(allow_null=True)
    decided_by = serializers.CharField(allow_null=True)


class TenantQuotaSerializer(serializers.Serializer):
    tenant = serializers.CharField()
    name = serializers.CharField()
    role = serializers.CharField(allow_null=True, help_text="Your role: member, admin, or null (staff).")
    limits = QuotaLimitsSerializer(allow_null=True, help_text="Effective: base quota + active grants.")
    base_limits = QuotaLimitsSerializer(allow_null=True, help_text="The quota without grants.")
    usage = UsageSerializer()
    over_limits = serializers.ListField(child=serializers.CharField())
    fair_share = FairShareSerializer(allow_null=True, help_text="2^(-usage/share); null until first computed.")
    grants = GrantSummarySerializer(many=True, help_text="Current, upcoming and recently ended grants.")
