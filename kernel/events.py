"""Cross-app reactions: the one mechanism by which a lower app tells a higher one that
something happened, without importing it (the apps are layered; see pyproject.toml's
import-linter contract).

Each event is a Django signal sent by the app that sees the change and received by the
app that reacts, which connects its receiver in its ``AppConfig.ready``:

- ``capacity_changed(reason=str)``: GPUs may have become placeable or unplaceable (a
  server came online, a GPU was cordoned or freed by the operator). Sent by ``nodes``;
  ``scheduling`` asks for a pass (``scheduling.triggers.request_pass``) after commit.

Send with ``capacity_changed.send(sender=<module or model>, reason=...)``; receivers run in
the sender's transaction, so they must only register after-commit work.
"""

from __future__ import annotations

from django.dispatch import Signal

capacity_changed = Signal()
