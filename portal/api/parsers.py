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
    """What is refused, and where: the keys and indexes it was found under are added as the walk
    unwinds (``within``), so a body that passes never has a path built for any of its values."""

    def __init__(self, message: str, *segments: str | int, names_where: bool = False):
        super().__init__(message)
        self.message, self.segments, self.names_where = message, list(segments), names_where

    def within(self, segment: str | int) -> None:
        self.segments.insert(0, segment)

    def path(self) -> str:
        path = ""
        for segment in self.segments:
            path = f"{path}[{segment}]" if isinstance(segment, int) else f"{path}.{segment}" if path else segment
        return path


class _Duplicated(dict):
    """An object in which ``duplicate`` appeared twice; refused by ``_check``, which finds where it is."""

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
    raise _Refused(f"{name} is not a JSON number.")


def _check_text(text: str) -> None:
    found = _UNSTORABLE.search(text)
    if found:
        what = "a NUL character" if found.group() == "\x00" else "a lone UTF-16 surrogate (not Unicode)"
        raise _Refused(f"contains {what}.", names_where=True)


def _check(value: Any, depth: int, strings: bool) -> None:
    """Refuse the first thing in ``value`` the database must not get. Only containers are walked
    into, and strings looked at only when ``strings`` (the body's text holds a NUL, a surrogate or
    an escape that could be one): walking every value and building its path was a tenth of a
    heartbeat's CPU. Depth is checked for each item, before it is entered (the root is depth 0)."""
    if isinstance(value, dict):
        if isinstance(value, _Duplicated):
            raise _Refused(f"Key {value.duplicate!r} appears twice in one object.", value.duplicate)
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        if strings and isinstance(value, str):
            _check_text(value)
        return
    deeper = depth + 1
    for key, item in items:
        try:
            if deeper > MAX_DEPTH:
                raise _Refused(f"Nested more than {MAX_DEPTH} levels deep.")
            if strings and isinstance(key, str):
                _check_text(key)
            if strings or isinstance(item, (dict, list)):
                _check(item, deeper, strings)
        except _Refused as exc:
            exc.within(key)
            raise


class StrictJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = stream.read().decode(encoding) if stream is not None else ""
            data = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
            # A NUL or a lone surrogate reaches a decoded string only as itself or as an escape.
            _check(data, 0, "\\u" in text or _UNSTORABLE.search(text) is not None)
        except _Refused as exc:
            path = exc.path()
            message = f"{path or 'The body'} {exc.message}" if exc.names_where else exc.message
            field = re.split(r"[.\[]", _shown(path), maxsplit=1)[0] or "non_field_errors"
            raise ValidationError({field: [_shown(message)]}) from None
        except RecursionError:
            raise ParseError(f"JSON parse error - nested more than {MAX_DEPTH} levels deep") from None
        except ValueError as exc:  # bad JSON, bad encoding, an integer of more than 4300 digits
            raise ParseError(f"JSON parse error - {exc}") from None
        return data
