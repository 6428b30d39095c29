"""`mlxring bench --compare --plot FILE.png`: the comparison as one picture.

Two panels side by side, one line per system: aggregate tokens/s against
concurrency (with the memory roofline, dashed) and TTFT p50 against concurrency;
a log x axis where the concurrencies span a decade.
"""

from __future__ import annotations

import importlib.util

from mlxring.errors import UserError

# the reference library in greys, mlxring in colour
STYLE = {
    "mlx-lm-generate": ("#9a9a9a", "s"),
    "mlx-lm-batch": ("#4d4d4d", "s"),
    "transformers-generate": ("#9a9a9a", "s"),
    "transformers-batch": ("#4d4d4d", "s"),
    "mlxring-single": ("tab:blue", "o"),
    "mlxring-lockstep": ("tab:orange", "o"),
    "mlxring-pipelined": ("tab:green", "o"),
}


def rate(tok_s: float) -> str:
    return f"{tok_s:,.0f}" if tok_s >= 100 else f"{tok_s:.3g}"


def require() -> None:
    """Fail now, before the benchmark runs, if matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib")


def draw(report: dict, path: str, title: str) -> None:
    """Write the report of `mlxring.jobs.compare.compare` as a PNG at `path`."""
    require()
    # lazy: matplotlib is the dev extra's and only --plot needs it
    from matplotlib.figure import Figure

    rows = report["rows"]
    levels = sorted({r["concurrency"] for r in rows})
    seconds = max(r["ttft_p50_ms"] for r in rows) >= 10_000  # TTFT in s once past 10 s
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    throughput, ttft = fig.subplots(1, 2)
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        color, marker = STYLE.get(system, (None, "o"))
        style = {"color": color, "marker": marker, "label": system, "linewidth": 2}
        throughput.plot(xs, [r["aggregate_tok_s"] for r in mine], **style)
        ttft.plot(xs, [r["ttft_p50_ms"] / (1000 if seconds else 1) for r in mine], **style)
    highest = max(r["aggregate_tok_s"] for r in rows)
    roof(throughput, levels, report["roofline"]["tok_s_batch1"], highest)
    throughput.set(title="throughput", ylabel="aggregate tokens/s")
    ttft.set(title="time to first token", ylabel=f"TTFT p50 ({'s' if seconds else 'ms'})")
    ttft.set_ylim(bottom=0)
    for ax in (throughput, ttft):
        if levels[-1] >= 10 * levels[0]:
            ax.set_xscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xticks([], minor=True)  # a log axis would label its own ticks between ours
        ax.set_xlabel("concurrent requests")
        ax.grid(True, alpha=0.3)
    handles, labels = throughput.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def roof(ax, levels: list[int], per_request: float, highest: float) -> None:
    """The memory roofline C x tok_s_batch1, dashed. The scale stays the systems': it
    reaches up to the roofline only where that is within 4x of them, else says so."""
    ceiling = [c * per_request for c in levels]
    label = f"memory roofline: C × {rate(per_request)} tok/s"
    ax.plot(levels, ceiling, color="black", linestyle="--", label=label)
    if ceiling[0] > 4 * highest:
        note = f"↑ memory roofline (dashed) above: {rate(ceiling[0])}–{rate(ceiling[-1])} tok/s"
        ax.annotate(note, (0.5, 0.98), xycoords="axes fraction", ha="center", va="top")
        top = 1.2 * highest
    else:
        top = max(1.2 * highest, min(1.1 * ceiling[-1], 4 * highest))
    ax.set_ylim(0, top)
