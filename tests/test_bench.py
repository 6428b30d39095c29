"""`mlxring bench --compare`: every system at every concurrency in one run, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlxring import cli
from mlxring.jobs.compare import parse_levels
from mlxring.jobs.workload import decode_rate, summarize

ROW_KEYS = {
    "system",
    "concurrency",
    "aggregate_tok_s",
    "per_request_tok_s",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "decode_tok_s",
    "roofline_fraction",
}
RING = ("mlxring-single", "mlxring-lockstep", "mlxring-pipelined")


def compare(model, *args: str) -> dict:
    argv = ["bench", "--model", str(model), "--compare", "mlx-lm", "--ranks", "2"]
    argv += ["--concurrency", "1,2", "--prompt-tokens", "4", "--gen-tokens", "4", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "mlxring", *argv, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(report: dict, systems: tuple[str, ...]) -> None:
    rows = report["rows"]
    assert {(r["system"], r["concurrency"]) for r in rows} == {
        (s, c) for s in systems for c in (1, 2)
    }
    assert len(rows) == len(systems) * 2
    for r in rows:
        assert set(r) == ROW_KEYS
        assert all(r[k] > 0 for k in ROW_KEYS - {"system", "concurrency"}), r
    roof = report["roofline"]
    assert roof["weight_bytes"] > 0 and roof["copy_gb_s"] > 0
    assert roof["tok_s_batch1"] == pytest.approx(roof["copy_gb_s"] * 1e9 / roof["weight_bytes"])


def test_compare_with_mlx_lm_and_plot(tiny_llama, tmp_path):
    png = tmp_path / "out.png"
    report = compare(tiny_llama, "--plot", str(png))
    check(report, ("mlx-lm-generate", "mlx-lm-batch", *RING))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_with_transformers_on_the_torch_backend(tiny_llama):
    report = compare(tiny_llama, "--backend", "torch")
    check(report, ("transformers-generate", "transformers-batch", *RING))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compare", "vllm"], "--compare vllm: the choices are mlx-lm, transformers"),
        (["--compare", "transformers"], "--compare transformers needs --backend torch"),
        (["--compare", "mlx-lm", "--concurrency", "1,x"], "--concurrency '1,x': give positive"),
        (["--compare", "mlx-lm", "--concurrency", "0,8"], "--concurrency '0,8': give positive"),
        (["--compare", "mlx-lm", "--ranks", "1"], "--ranks must be >= 2 with --compare"),
        (["--concurrency", "1,8"], "a list needs --compare"),
        (["--plot", "x.png"], "--plot draws a comparison: add --compare mlx-lm"),
    ],
)
def test_bad_options_are_one_clear_error(tiny_llama, capsys, args, message):
    assert cli.main(["bench", "--model", str(tiny_llama), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlxring bench: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_parse_levels_sorts_and_dedupes():
    assert parse_levels("8,1,8,32") == [1, 8, 32]


def test_decode_rate_counts_time_when_any_request_decodes():
    # two overlapping requests (0.1-1.1 s and 0.6-1.6 s), then a lone one (3-4 s)
    results = [
        {"times": [0.1, 0.6, 1.1]},
        {"times": [0.6, 1.1, 1.6]},
        {"times": [3.0, 4.0]},
        {"times": [5.0]},  # one token: no decode
    ]
    assert decode_rate(results) == pytest.approx(5 / 2.5)
    summary = summarize(results, 5.0, "single", 4)
    assert summary["decode_tok_s"] == pytest.approx(2.0)
