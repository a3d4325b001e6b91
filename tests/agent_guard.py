"""Run ``python -m nodes.agent`` with Django (and DRF, Channels) made unimportable.

The tests start every agent through this wrapper, so any Django import on any
code path they exercise makes the agent crash and the test fail.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

FORBIDDEN = {"django", "rest_framework", "channels", "daphne", "psycopg"}


class NoDjango:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"the agent must not import {name}")
        return None


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, as with `python -m`
    sys.meta_path.insert(0, NoDjango())
    sys.argv[0] = "nodes.agent"
    runpy.run_module("nodes.agent", run_name="__main__", alter_sys=True)
