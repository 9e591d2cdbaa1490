"""Gathering a head spread over small reads (issue 11, http1.gather_start/gather_more): the
held bytes are released no later than the read that completes the head, however the head is
split, and no more than GATHER_BYTES are ever held."""

from __future__ import annotations

import itertools

import pytest

from drainproxy.dataplane.http1 import GATHER_BYTES, gather_more, gather_start

HEADS = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\nHost: h\n\n",  # bare LF: llhttp refuses it, but must get to see it
    b"HTTP/1.1 100 Continue\r\n\r\n",
]


def released_at(pieces: list[bytes]) -> int | None:
    """Feed ``pieces`` as reads: the first goes to the parser (and ends inside the head);
    the index of the read that releases what was gathered, or None."""
    gathered = gather_start(pieces[0])
    fed = pieces[0]
    for index, piece in enumerate(pieces[1:], start=1):
        held = gather_more(gathered, piece)
        if held is not None:
            fed += held
            assert fed == b"".join(pieces[: index + 1]), "bytes lost or reordered"
            return index
    return None


@pytest.mark.parametrize("head", HEADS)
def test_every_two_and_three_way_split_is_released_by_its_last_piece(head: bytes) -> None:
    for cuts in itertools.chain(
        itertools.combinations(range(1, len(head)), 1),
        itertools.combinations(range(1, len(head)), 2),
    ):
        bounds = [0, *cuts, len(head)]
        pieces = [head[a:b] for a, b in itertools.pairwise(bounds)]
        assert released_at(pieces) is not None, pieces


@pytest.mark.parametrize("head", HEADS)
def test_a_byte_at_a_time_is_released_by_the_last_byte(head: bytes) -> None:
    for first in range(1, len(head)):
        pieces = [head[:first], *(bytes([byte]) for byte in head[first:])]
        assert released_at(pieces) is not None


def test_an_unfinished_head_is_held_until_gather_bytes() -> None:
    gathered = gather_start(b"GET / HTTP/1.1\r\nX-Long: ")
    held = None
    total = 0
    while held is None:
        held = gather_more(gathered, b"a")
        total += 1
    assert total == GATHER_BYTES
    assert held == b"a" * GATHER_BYTES
