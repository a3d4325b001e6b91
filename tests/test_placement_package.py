"""The placement core is a package of its own: it loads without Django or any other app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
before = set(sys.modules)
import scheduling.placement
print("\\n".join(sorted(set(sys.modules) - before)))
"""


def test_the_placement_core_imports_nothing_but_the_standard_library_and_itself():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    stdlib = set(sys.stdlib_module_names)
    foreign = [m for m in loaded if m.split(".")[0] not in stdlib
               and m != "scheduling" and not m.startswith("scheduling.placement")]
    assert "scheduling.placement.planner" in loaded
    assert foreign == []
