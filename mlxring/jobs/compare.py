"""`mlxring bench --compare`: the reference library's own generation next to mlxring on
one node, a lockstep ring and a pipelined ring, on one checkpoint, at each concurrency.

The baselines run in this process (`mlxring.jobs.baselines`); each mlxring system is
one launch of the head's `bench` job over every concurrency. Every system gets the
same synthetic prompts and generates all its tokens (EOS ignored). Each row also gives
the per-request decode rate as a fraction of the memory roofline (`jobs.roofline`).
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from tqdm import tqdm

from mlxring.cluster.config import EngineConfig
from mlxring.cluster.launch import launch_job
from mlxring.errors import UserError
from mlxring.jobs import baselines, roofline
from mlxring.jobs.workload import summarize, synthetic_prompts

# (system, ranks (None: --ranks), engine mode); one rank: lockstep and pipelined agree
RING_SYSTEMS = (
    ("mlxring-single", 1, "pipelined"),
    ("mlxring-lockstep", None, "lockstep"),
    ("mlxring-pipelined", None, "pipelined"),
)
BASELINES = {
    "mlx": ("mlx-lm-generate", "mlx-lm-batch"),
    "torch": ("transformers-generate", "transformers-batch"),
}
COLUMNS = {  # row key: (summary key, table heading)
    "aggregate_tok_s": ("aggregate_tok_s", "aggregate tok/s"),
    "per_request_tok_s": ("per_request_tok_s", "per-request tok/s"),
    "ttft_p50_ms": ("ttft_ms_p50", "TTFT p50 ms"),
    "ttft_p95_ms": ("ttft_ms_p95", "TTFT p95 ms"),
    "decode_tok_s": ("decode_tok_s", "decode tok/s"),
}


@dataclass(frozen=True)
class Workload:
    model: str
    ranks: int
    levels: list[int]  # concurrencies, ascending
    prompt_tokens: int
    gen_tokens: int
    compute: dict | None = None  # the torch backend's settings; None: mlx
    token_budget: int = EngineConfig.token_budget  # tokens per step of the mlxring engine

    @property
    def backend(self) -> str:
        return (self.compute or {}).get("backend", "mlx")

    @property
    def systems(self) -> list[str]:
        return [*BASELINES[self.backend], *(name for name, _, _ in RING_SYSTEMS)]


def parse_levels(text: str) -> list[int]:
    """`--concurrency 1,8,32` -> [1, 8, 32]; a UserError for anything else."""
    try:
        levels = sorted({int(part) for part in text.split(",")})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        raise UserError(
            f"--concurrency {text!r}: give positive whole numbers separated by commas, e.g. 1,8"
        )
    return levels


def row(system: str, summary: dict, roof: dict) -> dict:
    """A summary of `mlxring.jobs.workload.summarize` as a row of the comparison."""
    figures = {key: summary[source] for key, (source, _) in COLUMNS.items()}
    fraction = roofline.fraction(summary["per_request_tok_s"], roof)
    return {
        "system": system,
        "concurrency": summary["concurrency"],
        **figures,
        "roofline_fraction": fraction,
    }


class SummaryLines:
    """The head's stdout during a ring run: each JSON line is one concurrency's summary."""

    def __init__(self, on_summary: Callable[[dict], None]):
        self.on_summary = on_summary
        self.pending = b""

    def write(self, chunk: bytes) -> int:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"{"):
                self.on_summary(json.loads(line))
            elif line.strip():  # anything else the head printed: keep it visible
                print(line.decode(errors="replace"), file=sys.stderr, flush=True)
        return len(chunk)

    def flush(self) -> None:
        pass


def run_baselines(work: Workload, roof: dict, bar: tqdm) -> list[dict]:
    """The reference library's single-stream and batched generation, in this process."""
    if work.compute:
        device, dtype = work.compute["device"], work.compute["dtype"]
        runners, vocab = baselines.transformers_runners(work.model, work.gen_tokens, device, dtype)
    else:
        runners, vocab = baselines.mlx_lm_runners(work.model, work.gen_tokens)
    prompts = synthetic_prompts(work.levels[-1], work.prompt_tokens, vocab)
    rows = []
    for system, run in runners.items():
        bar.set_description(system)
        run(prompts[:1])  # warm-up
        for c in work.levels:
            results, wall = run(prompts[:c])
            rows.append(row(system, summarize(results, wall, system, c), roof))
            bar.update()
    return rows


def run_ring(work: Workload, system: str, ranks: int, mode: str, roof: dict, bar) -> list[dict]:
    """One launch of the `bench` job on a local ring: a row per concurrency."""
    bar.set_description(system)
    rows: list[dict] = []

    def on_summary(summary: dict) -> None:
        rows.append(row(system, summary, roof))
        bar.update()

    engine = EngineConfig(
        mode=mode, max_batch=max(16, work.levels[-1]), token_budget=work.token_budget
    )
    opts = {
        "concurrency": work.levels[-1],
        "concurrencies": work.levels,
        "prompt_tokens": work.prompt_tokens,
        "gen_tokens": work.gen_tokens,
        "mode": mode,
        "engine": asdict(engine),
    }
    code = launch_job(
        None, ranks, work.model, "bench", opts, SummaryLines(on_summary), work.compute
    )
    if code or len(rows) != len(work.levels):
        raise UserError(f"{system}: the ring run failed (exit {code}); its output is above")
    return rows


def run_compare(work: Workload) -> dict:
    """Every system at every concurrency: {"rows": [...], "roofline": {...}}."""
    roof = roofline.measure(work.model, work.compute)
    total = len(work.systems) * len(work.levels)
    with tqdm(total=total, unit="run", file=sys.stderr, leave=False) as bar:
        rows = run_baselines(work, roof, bar)
        gc.collect()  # the baseline's model, before the ranks load theirs
        for system, ranks, mode in RING_SYSTEMS:
            rows += run_ring(work, system, ranks or work.ranks, mode, roof, bar)
    return {"rows": rows, "roofline": roof}


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def table(report: dict) -> str:
    """The comparison as a Markdown table, and the roofline under it."""
    lines = [
        "| system | concurrency | " + " | ".join(h for _, h in COLUMNS.values()) + " | roofline |",
        "| --- " * (len(COLUMNS) + 3) + "|",
    ]
    for r in report["rows"]:
        values = [r["concurrency"], *(r[k] for k in COLUMNS), r["roofline_fraction"]]
        lines.append(f"| {r['system']} | " + " | ".join(map(cell, values)) + " |")
    roof = report["roofline"]
    lines.append(
        f"\nroofline: {roof['weight_bytes'] / 1e6:.0f} MB of weights read per decode step, "
        f"copy {roof['copy_gb_s']:g} GB/s: at most {roof['tok_s_batch1']:g} tok/s per request"
    )
    return "\n".join(lines)
