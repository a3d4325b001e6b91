"""The strict JSON parser refuses exactly what its rules refuse, naming the same field and place.

``_check`` walks only into containers and builds the offending value's path only on the way out.
The reference below is the rule as it was first written (every value visited, its path built on
the way in): on any body, the parser must give the same verdict and the same 400 message.
"""

from __future__ import annotations

import io
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from rest_framework.exceptions import ValidationError

from portal.api.parsers import _UNSTORABLE, MAX_DEPTH, StrictJSONParser, _pairs, _shown


class _Reference(Exception):
    pass


def _reference(value, path: str = "", depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise _Reference(path, f"Nested more than {MAX_DEPTH} levels deep.")
    if isinstance(value, str):
        found = _UNSTORABLE.search(value)
        if found:
            what = "a NUL character" if found.group() == "\x00" else "a lone UTF-16 surrogate (not Unicode)"
            raise _Reference(path, f"{path or 'The body'} contains {what}.")
    elif isinstance(value, dict):
        if getattr(value, "duplicate", None) is not None and type(value) is not dict:
            key = value.duplicate
            raise _Reference(f"{path}.{key}" if path else key, f"Key {key!r} appears twice in one object.")
        for key, item in value.items():
            _reference(key, f"{path}.{key}" if path else key, depth + 1)
            _reference(item, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reference(item, f"{path}[{index}]", depth + 1)


def _expected(text: str) -> dict | None:
    try:
        _reference(json.loads(text, object_pairs_hook=_pairs))
    except _Reference as exc:
        path, message = exc.args
        return {re.split(r"[.\[]", _shown(path), maxsplit=1)[0] or "non_field_errors": [_shown(message)]}
    return None


def _parsed(text: str) -> dict | None:
    try:
        StrictJSONParser().parse(io.BytesIO(text.encode()))
    except ValidationError as exc:
        return {field: [str(m) for m in messages] for field, messages in exc.detail.items()}
    return None


# JSON text written by hand, so objects can repeat a key.
texts = st.text(alphabet=st.sampled_from(["a", "é", "\x00", "\ud800", "\udfff", " ", ".", "[", "\\", '"']),
                max_size=4)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts


def _nested(children):
    keys = st.sampled_from(["a", "b", "\x00", "\udc00", "x.y"]) | texts
    return st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]") | st.lists(
        st.tuples(keys, children), max_size=4).map(
        lambda pairs: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}")


bodies = st.recursive(scalars.map(json.dumps), _nested, max_leaves=40)


def _deep(text: str, levels: int) -> str:
    for i in range(levels):
        text = f"[{text}]" if i % 2 else f'{{"k":{text}}}'
    return text


@settings(max_examples=400, deadline=None)
@given(bodies, st.integers(min_value=0, max_value=MAX_DEPTH + 3))
def test_the_parser_refuses_what_the_rules_refuse_with_the_same_message(body, levels):
    text = _deep(body, levels)
    assert _parsed(text) == _expected(text)


def test_depth_is_counted_for_scalars_in_lists_as_in_objects():
    assert _parsed(_deep("1", MAX_DEPTH)) is None
    for shape in ("[1]", '{"k":1}'):
        refused = _parsed(_deep(shape, MAX_DEPTH))
        assert refused == _expected(_deep(shape, MAX_DEPTH))
        assert list(refused.values()) == [[f"Nested more than {MAX_DEPTH} levels deep."]]
