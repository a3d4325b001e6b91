"""The GPU server agent: ``python -m nodes.agent``.

Runs on each GPU server and needs only the standard library, nvidia-ml-py,
httpx and websockets: it never imports Django and never touches the database.
It enrols with a join token, heartbeats GPU metrics read through NVML, receives
its assignments (websocket push, HTTP long-poll fallback), runs each task as a
process group on its allocated GPUs, ships the task's log and reports its end.
"""

from __future__ import annotations

__version__ = "0.1.0"
