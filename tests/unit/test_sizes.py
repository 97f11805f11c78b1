"""parse_size / format_size: the human sizes the CLI and the API accept and print."""

from __future__ import annotations

import pytest

from mirrorpool.sizes import format_size, parse_size

K, M, G, T, P = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("512B", 512),
        ("1K", K),
        ("1k", K),
        ("1KB", K),
        ("1KiB", K),
        ("1kib", K),
        ("64M", 64 * M),
        ("64m", 64 * M),
        ("10G", 10 * G),
        ("1.5G", 3 * G // 2),
        ("0.5K", 512),
        ("2T", 2 * T),
        ("1P", P),
        ("  64M  ", 64 * M),
        ("64 M", 64 * M),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_passes_ints_through() -> None:
    assert parse_size(12345) == 12345
    assert parse_size(0) == 0


@pytest.mark.parametrize(
    "text", ["", " ", "12Q", "M", "abc", "-1", "-1M", "1e3", "1.5", "0.1M", "1.1K", "1MM", "1 2M",
             "0x100", "1,5G", "64MiBs"],
)
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_parse_size_message_says_how() -> None:
    with pytest.raises(ValueError, match="is not a size .*64M"):
        parse_size("12Q")
    with pytest.raises(ValueError, match="whole number of bytes"):
        parse_size("1.5")


def test_parse_size_exact_for_large_integers() -> None:
    assert parse_size(str(2**53 + 1)) == 2**53 + 1


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0B"),
        (100, "100B"),
        (1023, "1023B"),
        (K, "1K"),
        (1536, "1.5K"),
        (M, "1M"),
        (64 * M, "64M"),
        (3 * G // 2, "1.5G"),
        (10 * G, "10G"),
        (T, "1T"),
        (3 * T, "3T"),
        (P, "1P"),
        (M + 512, "1024.5K"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize("n", [512, K, 1536, M, 64 * M, 3 * G // 2, 10 * G, T, 3 * T])
def test_format_then_parse_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("n", [M + K, G + M, 10 * G + 512 * K + K])
def test_format_size_never_hides_a_difference(n: int) -> None:
    assert parse_size(format_size(n)) == n
