"""README.zh-CN.md is kept in step with README.md: one Chinese section per English one,
each naming the English title it mirrors."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_chinese_readme_has_a_section_for_every_english_one():
    english = re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), re.M)
    mirrored = re.findall(r"^## .+?（(.+)）$", (ROOT / "README.zh-CN.md").read_text(), re.M)  # noqa: RUF001
    assert mirrored == english
