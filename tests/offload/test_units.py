from __future__ import annotations

import pytest

from offload.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GB", 12 * 10**9),
        ("12GiB", 12 * 2**30),
        ("12gib", 12 * 2**30),
        ("800MB", 800 * 10**6),
        ("1.5G", int(1.5 * 2**30)),
        ("512M", 512 * 2**20),
        ("64kB", 64_000),
        ("64KiB", 65_536),
        ("1T", 2**40),
        ("1024", 1024),
        ("100B", 100),
        (" 2 GB ", 2 * 10**9),
        (12345, 12345),
    ],
)
def test_parse_size_forms(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GB", "12XB", "twelve", "-1GB", "0", "0GB", "1e9", "12 G B", "1..5G", True, -5]
)
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match=r"size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(1536) == "1.50 KiB"
    assert format_size(12 * 2**30) == "12.00 GiB"
    assert format_size(10) == "10 B"
