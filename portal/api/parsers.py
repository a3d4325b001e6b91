"""The one JSON parser of every API (users' and agents'): strict, so that no body
can reach the database as something it cannot store or the code did not expect.

Refused with 400, naming the top-level field: duplicate keys (which one would
win is an accident of the parser), NaN and Infinity, nesting deeper than
``MAX_DEPTH``, and strings holding NUL (PostgreSQL text cannot store it) or
lone UTF-16 surrogates (not Unicode, cannot be encoded for the database).
"""

from __future__ import annotations

import json
import re
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser

MAX_DEPTH = 16  # a batch of tasks with env maps is 4 deep
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _shown(text: str) -> str:
    """``text`` as it can be stored and rendered: NUL and surrogates as escapes."""
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")


class _Refused(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path, self.message = _shown(path), _shown(message)


class _Duplicated(dict):
    """An object in which ``duplicate`` appeared twice; refused by ``_check``, which knows where it is."""

    duplicate = ""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            out = _Duplicated(out)
            out.duplicate = key
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise _Refused("", f"{name} is not a JSON number.")


def _plainly_clean(value: Any, depth: int, strings: bool) -> bool:
    """True when ``_check`` would find nothing, decided without building a path per value (the
    path walk was a tenth of a heartbeat's CPU); False sends the body to ``_check`` for the
    error. ``strings``: whether any string could hold what PostgreSQL cannot store."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, dict):
        if isinstance(value, _Duplicated) or (value and depth >= MAX_DEPTH):
            return False
        for key, item in value.items():
            if strings and _UNSTORABLE.search(key):
                return False
            if (isinstance(item, (dict, list)) or strings) and not _plainly_clean(item, depth + 1, strings):
                return False
        return True
    if isinstance(value, list):
        if value and depth >= MAX_DEPTH:
            return False
        for item in value:
            if (isinstance(item, (dict, list)) or strings) and not _plainly_clean(item, depth + 1, strings):
                return False
        return True
    return not (strings and isinstance(value, str) and _UNSTORABLE.search(value))


def _check(value: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Refused(path, f"Nested more than {MAX_DEPTH} levels deep.")
    if isinstance(value, str):
        found = _UNSTORABLE.search(value)
        if found:
            what = "a NUL character" if found.group() == "\x00" else "a lone UTF-16 surrogate (not Unicode)"
            raise _Refused(path, f"{path or 'The body'} contains {what}.")
    elif isinstance(value, dict):
        if isinstance(value, _Duplicated):
            key = value.duplicate
            raise _Refused(f"{path}.{key}" if path else key, f"Key {key!r} appears twice in one object.")
        for key, item in value.items():
            _check(key, f"{path}.{key}" if path else key, depth + 1)
            _check(item, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]", depth + 1)


class StrictJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = stream.read().decode(encoding) if stream is not None else ""
            data = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
            # A NUL or a lone surrogate reaches a decoded string only as itself or as an escape.
            if not _plainly_clean(data, 0, "\\u" in text or _UNSTORABLE.search(text) is not None):
                _check(data, "", 0)
        except _Refused as exc:
            field = re.split(r"[.\[]", exc.path, maxsplit=1)[0] or "non_field_errors"
            raise ValidationError({field: [exc.message]}) from None
        except RecursionError:
            raise ParseError(f"JSON parse error - nested more than {MAX_DEPTH} levels deep") from None
        except ValueError as exc:  # bad JSON, bad encoding, an integer of more than 4300 digits
            raise ParseError(f"JSON parse error - {exc}") from None
        return data
