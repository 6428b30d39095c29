"""The ring transport over a real mlx.distributed ring on loopback."""

from __future__ import annotations

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
