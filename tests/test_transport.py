"""The ring transport over a real mlx.distributed ring on loopback."""

from __future__ import annotations

import pytest

from tests.ringutil import ROOT, run_ring

FLOOD = str(ROOT / "tests" / "scripts" / "ring_flood.py")


def test_four_ranks_sending_64mb_at_once_do_not_deadlock():
    """Raw `send`s deadlock here at 64 MB; the transport's send thread must not."""
    results = run_ring(FLOOD, 4, str(64 * 2**20), "2", timeout=240)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{out}"
        assert f"rank {rank}: 2 x {64 * 2**20} bytes ok" in out


def test_small_messages_in_order_on_three_ranks():
    results = run_ring(FLOOD, 3, "1000", "50", timeout=120)
    assert all(code == 0 for code, _ in results), results


HOPS = str(ROOT / "tests" / "scripts" / "ring_hops.py")
LIES = str(ROOT / "tests" / "scripts" / "ring_lies.py")


def test_steady_decode_hops_are_one_message_of_at_most_30_percent_padding():
    """Issue 15: hidden 64..8192, fp16/fp32, batch 1/8/32 (8192 fp16 at batch 32 included),
    and two pipelined groups of different sizes, on a real sealed ring of 3 ranks; every rank
    counts its transport's sends per hop."""
    results = run_ring(HOPS, 3, "steady", timeout=180)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{out}"
        assert f"rank {rank}: 48 steady hops checked" in out, out
        assert "not lean" not in out, out


def test_sizes_that_jump_small_large_small_arrive_intact():
    results = run_ring(HOPS, 2, "jumps", timeout=120)
    assert all(code == 0 for code, _ in results), results


@pytest.mark.parametrize(
    ("lie", "error"),
    [
        ("next-too-big", "announced a 2097152-byte next message"),
        ("next-too-small", "announced a 16-byte next message"),
        ("more", "no message header from rank 0 where one was due"),
        ("fewer", "no message header from rank 0 where one was due"),
        ("remainder-in-a-slot-not-full", "its sizes do not fit the agreed"),
        ("remainder-too-large", "announced a 4294967295-byte remainder"),
        ("garbage-body", "has no metadata object"),
    ],
)
def test_a_rank_that_lies_about_sizes_gets_a_protocol_error_not_a_hang(lie, error):
    (_, liar), (code, out) = run_ring(LIES, 2, lie, timeout=60)
    assert code == 0, out
    assert "rank 1: ProtocolError: " in out and error in out, out + liar


IDLE = str(ROOT / "tests" / "scripts" / "ring_idle.py")


@pytest.mark.parametrize("size", [2, 3])
def test_a_rank_waiting_on_its_left_neighbour_sleeps_instead_of_spinning(size):
    """mlx's ring receive spins a core until the bytes come (about 60% of the wait here
    without `ring.idle`); the transport waits asleep in poll on the same sockets first."""
    results = run_ring(IDLE, size, "2.0", timeout=120)
    assert all(code == 0 for code, _ in results), results
    line = results[0][1].strip().splitlines()[-1]
    fields = dict(part.split("=") for part in line.split())
    assert fields["found"] == "True", line
    wall, cpu = float(fields["wall"]), float(fields["cpu"])
    assert wall >= 2.0, line
    assert cpu < 0.25 * wall, f"the waiting rank spun: {line}"
