"""The fast JSON reader and writer give exactly the standard library's values."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.jsontext import dumps, loads

VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(VALUES)
def test_what_is_written_reads_back_as_the_standard_library_reads_it(value: object) -> None:
    text = dumps(value)
    assert loads(text) == json.loads(text) == json.loads(json.dumps(value))
    assert loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        "123456789012345678901234567890",
        "[-123456789012345678901234567890, 18446744073709551616]",
        '{"n": 9223372036854775808}',
        "0.1234567890123456789012345",
    ],
)
def test_long_numbers_read_exactly(text: str) -> None:
    assert loads(text) == json.loads(text)
    assert type(loads(f"[{text}]")[0]) is type(json.loads(f"[{text}]")[0])


def test_what_only_the_standard_library_reads_is_read_by_it() -> None:
    assert math.isnan(loads("NaN"))
    assert loads('"\\ud800"') == "\ud800"


@pytest.mark.parametrize("text", ["", "{", "[1,]", b"\xff"])
def test_text_that_is_not_json_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  # either parser's error, whatever its words
        loads(text)


def test_numbers_json_cannot_hold_are_written_as_null() -> None:
    """Validation refuses them before anything is stored; should one reach the encoder, the text
    it writes is still JSON (json.dumps would write NaN, which PostgreSQL's jsonb refuses)."""
    assert dumps([math.nan, math.inf, -math.inf]) == "[null,null,null]"
