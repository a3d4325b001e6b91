"""The GPU and server listings' filters (``GET /api/v1/gpus?state=&server=``,
``GET /api/v1/servers?status=``). A bad value is a form error: a 400 naming the field."""

from __future__ import annotations

import django_filters
from django.db.models import QuerySet

from nodes import inventory
from nodes.models import GPU, Node, NodeStatus


def _one_of(values) -> dict[str, str]:
    return {"invalid_choice": f"Must be one of {', '.join(values)}."}


class GPUFilter(django_filters.FilterSet):
    server = django_filters.CharFilter(field_name="node__name", help_text="only this server's GPUs")
    state = django_filters.ChoiceFilter(choices=[(s, s) for s in inventory.GPU_STATES], method="filter_state",
                                        error_messages=_one_of(inventory.GPU_STATES),
                                        help_text=f"one of {', '.join(inventory.GPU_STATES)}")

    class Meta:
        model = GPU
        fields = ["server", "state"]

    def filter_state(self, qs: QuerySet, name: str, value: str) -> QuerySet:
        # A GPU's state is named by one function (nodes.gpu_state, through inventory.state_of), in Python: the
        # listing is every GPU of the cluster at most, so the rows are read once here.
        return qs.filter(pk__in=[gpu.pk for gpu in qs if inventory.state_of(gpu) == value])


class ServerFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=NodeStatus.choices, error_messages=_one_of(NodeStatus.values),
                                         help_text=", ".join(NodeStatus.values))

    class Meta:
        model = Node
        fields = ["status"]
