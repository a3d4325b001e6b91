"""The strict JSON parser's fast check agrees with its full one on any JSON value.

``_plainly_clean`` lets a body through without the path-building walk of ``_check``; it may
only ever say "clean" where ``_check`` finds nothing (the API's 400s for NUL, lone surrogates,
duplicate keys and depth keep coming from ``_check``, with the offending field named).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from portal.api.parsers import _UNSTORABLE, MAX_DEPTH, _check, _pairs, _plainly_clean, _Refused

texts = st.text(alphabet=st.sampled_from(["a", "é", "\x00", "\ud800", "\udfff", " ", "\\", '"']), max_size=4)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts


def _nested(children):
    pairs = st.lists(st.tuples(st.sampled_from(["a", "b", "\x00", "\udc00"]) | texts, children), max_size=4)
    return st.lists(children, max_size=4) | pairs.map(_pairs)


values = st.recursive(scalars, _nested, max_leaves=40)


def _deep(value, levels: int):
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _check_passes(value) -> bool:
    try:
        _check(value, "", 0)
    except _Refused:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(values, st.integers(min_value=0, max_value=MAX_DEPTH + 3))
def test_the_fast_check_never_passes_what_the_full_check_refuses(value, levels):
    value = _deep(value, levels)
    assert _plainly_clean(value, 0, True) == _check_passes(value)
    # Without string checks (the body holds no NUL and no surrogate), only structure decides.
    if not any(_UNSTORABLE.search(text) for text in _strings(value)):
        assert _plainly_clean(value, 0, False) == _check_passes(value)

def test_depth_is_counted_for_scalars_in_lists_as_in_objects():
    assert _check_passes(_deep(1, MAX_DEPTH)) and _plainly_clean(_deep(1, MAX_DEPTH), 0, False)
    for shape in ([1], {"k": 1}):
        too_deep = _deep(shape, MAX_DEPTH)
        assert not _check_passes(too_deep)
        assert not _plainly_clean(too_deep, 0, False)
