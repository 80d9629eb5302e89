"""The one bounded JSON reader (issue #31): every failure a JSONRefused, never a RecursionError."""

from __future__ import annotations

import pytest

from zoo_agent.jsonbound import MAX_DEPTH, JSONRefused, loads


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ("[" * 100_000, "nests deeper than 64"),
        ('{"a":' * 100_000, "nests deeper than 64"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nests deeper than 64"),
        (b"\xff{}", "not UTF-8"),
        ("{", "not JSON"),
        ('{"x": NaN}', "NaN is not a JSON number"),
        ("[Infinity]", "Infinity is not a JSON number"),
        ("[1e999]", "too large for a double"),
        ("[" + "9" * 5000 + "]", "a number with too many digits"),
        ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
        ('{"a": 1}'.encode("utf-32-le"), "not JSON"),  # NULs are valid UTF-8; no guessing of another encoding
    ],
)
def test_refused_with_one_line(data: str | bytes, says: str) -> None:
    with pytest.raises(JSONRefused, match=says) as caught:
        loads(data)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers that catch ValueError keep working


def test_accepts_up_to_the_depth_and_wide_documents() -> None:
    deep = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads(deep) is not None
    wide = "[" + ",".join(['{"a": [1, 2]}'] * 10_000) + "]"
    assert len(loads(wide)) == 10_000
    assert loads(b'{"model": "t", "messages": []}') == {"model": "t", "messages": []}
    assert loads(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # a UTF-8 byte order mark may be ignored (RFC 8259 section 8.1)


def test_limit_is_checked_before_parsing() -> None:
    with pytest.raises(JSONRefused, match="larger than 10 bytes"):
        loads(b"[" + b"1," * 10 + b"1]", limit=10)
    assert loads(b"[1]", limit=10) == [1]
