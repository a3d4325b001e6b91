"""A GPU's state in one word: the one vocabulary of the API, the admin and the live grid.

The precedence, first match wins: its server is not active (offline, in maintenance or
draining: nothing new lands there) → unavailable; the agent reports an error → error;
an operator cordoned it → cordoned; it is held back from scheduling (its ``reserved``
flag or the scheduler's ``reserved_gpus``) → reserved; a task holds it → allocated;
else free. Pages choose the colours; the words and their order are these.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from nodes.models import GPU, GPUHealth, Node, NodeStatus


class GPUState(models.TextChoices):
    FREE = "free", _("free")
    ALLOCATED = "allocated", _("allocated")
    CORDONED = "cordoned", _("cordoned")
    RESERVED = "reserved", _("reserved")
    ERROR = "error", _("error")
    UNAVAILABLE = "unavailable", _("unavailable")


def is_reserved_by_config(gpu: GPU, node: Node) -> bool:
    """Listed in the scheduler's ``reserved_gpus`` (by UUID or ``server:index``)."""
    reserved = settings.SCHEDULER.reserved_gpus
    return bool(reserved) and (gpu.uuid in reserved or f"{node.name}:{gpu.index}" in reserved)


def gpu_state(gpu: GPU, node: Node, *, allocated: bool) -> GPUState:
    """Name the state of ``gpu`` on ``node``; ``allocated``: a task holds it now."""
    if node.status != NodeStatus.ACTIVE:
        return GPUState.UNAVAILABLE
    if gpu.health == GPUHealth.ERROR:
        return GPUState.ERROR
    if gpu.cordoned:
        return GPUState.CORDONED
    if gpu.reserved or is_reserved_by_config(gpu, node):
        return GPUState.RESERVED
    if allocated:
        return GPUState.ALLOCATED
    return GPUState.FREE
