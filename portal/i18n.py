"""Compile the committed translations (``locale/*/LC_MESSAGES/*.po``) into the ``.mo``
files Django reads, with polib: ``make run``/``make test`` need no gettext tools.
Only catalogues whose ``.po`` is newer than their ``.mo`` are rebuilt.

    python -m portal.i18n            # what make does
"""

from __future__ import annotations

import sys
from pathlib import Path

import polib

LOCALE_DIR = Path(__file__).resolve().parent.parent / "locale"


def compile_all(locale_dir: Path = LOCALE_DIR) -> list[Path]:
    built = []
    for po_path in sorted(locale_dir.glob("*/LC_MESSAGES/*.po")):
        mo_path = po_path.with_suffix(".mo")
        if mo_path.exists() and mo_path.stat().st_mtime >= po_path.stat().st_mtime:
            continue
        # Fuzzy entries are guesses a translator has not confirmed: like msgfmt, leave them out.
        polib.pofile(str(po_path)).save_as_mofile(str(mo_path))
        built.append(mo_path)
    return built


if __name__ == "__main__":
    for path in compile_all():
        print(f"compiled {path.relative_to(LOCALE_DIR.parent)}")
    sys.exit(0)
