"""Torch on CUDA (issue 19): one torch rank against transformers' `generate` and the
memory-bandwidth roofline, on one GPU, in one run.

    python bench/torch_cuda.py [--model DIR] [--prompt-tokens 8] [--gen-tokens 128]
                               [--rounds 3] [--json]

The model is issue 19's 1.04 B-parameter Llama (`mlxring make-tiny --family llama
--layers 22 --hidden 2048 --intermediate 5632 --heads 32`, written once, fp32 on
disk), run in float16 by both systems. Measured in this process:

- the roofline: device-to-device copy bandwidth (`mlxring.jobs.roofline`, bytes read
  plus written) over the fp16 weight bytes = the most tokens/s one stream can decode;
- transformers' `generate` at batch 1 and 8 (`mlxring.jobs.baselines`: greedy, EOS
  ignored);
- the mlxring engine over one torch shard (no channel) at concurrency 1 and 8, the
  requests submitted at once, per decode mode: "compiled" (static cache, the step
  compiled by torch.compile and captured as a CUDA graph: the CUDA default), "graphs"
  (captured uncompiled), "static" (the same steps op by op), "eager" (exact-size
  caches, op by op); the warm-up run's time shows what compiling costs once;
- the same decode steps straight through the shard (no engine, no scheduler): what
  is left of a step once the engine's own work is taken away;
- greedy tokens: mlxring (the default mode) against transformers, each prompt alone
  and the batch of 8; at a first divergence, transformers' fp16 logits there.

Every configuration runs `--rounds` times ("static" and "eager", slow, `--slow-rounds`),
a warm-up run before each at its own concurrency, rounds interleaved; medians are
reported. Targets (issue 19): batch-1
decode >= 50% of the roofline; concurrency 8 >= 5 x transformers' batch 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import torch
import transformers
from transformers import AutoModelForCausalLM

from mlxring.cluster.config import EngineConfig
from mlxring.engine.engine import Engine
from mlxring.engine.request import SamplingParams
from mlxring.jobs import baselines, roofline
from mlxring.jobs.workload import run_all, summarize, synthetic_prompts
from mlxring.model.tokenizer import load_tokenizer
from mlxring.shards import load_shard
from mlxring.tiny.make import make_tiny

MODEL = Path(__file__).resolve().parent.parent / ".cache" / "bench-llama-1b"
# `mlxring make-tiny --family llama --layers 22 --hidden 2048 --intermediate 5632 --heads 32`
SHAPE = {"layers": 22, "hidden": 2048, "intermediate": 5632, "heads": 32}
MODES = ("compiled", "graphs", "static", "eager")
SLOW = ("static", "eager")
LEVELS = (1, 8)
KEYS = ("aggregate_tok_s", "decode_tok_s", "per_request_tok_s", "ttft_ms_p50")


def engine_run(shard, tokenizer, prompts, gen: int, mode: str) -> tuple[dict, list[list[int]]]:
    """A warm-up run, then a timed one, of `prompts` submitted at once: summary, tokens."""
    shard.decoder.set_mode(mode)
    config = EngineConfig(max_batch=max(16, len(prompts)))
    engine = Engine(shard, None, tokenizer, config)
    params = [SamplingParams(max_tokens=gen, ignore_eos=True) for _ in prompts]
    try:
        started = time.perf_counter()
        run_all(engine, prompts, params)  # warm-up: this batch size's arena and graph
        warmup = time.perf_counter() - started
        started = time.perf_counter()
        results = run_all(engine, prompts, params)
        wall = time.perf_counter() - started
    finally:
        engine.close()
    summary = summarize(results, wall, mode, len(prompts))
    summary["warmup_s"] = round(warmup, 2)
    return summary, [r["tokens"] for r in results]


def shard_decode(shard, prompts: list[list[int]], gen: int) -> float:
    """Aggregate tok/s of `gen` greedy decode steps run straight through the shard."""
    singles = []
    for p in prompts:  # prefill all but the last token, as the engine does
        caches = shard.make_cache()
        shard(shard.embed(mx.array([p[:-1]])), caches)
        singles.append(caches)
    batch = [layer[0].merge(list(layer)) for layer in zip(*singles)]
    seqs = [SimpleNamespace(params=SamplingParams(), tokens=[]) for _ in prompts]
    tokens = [[p[-1]] for p in prompts]
    for i in range(gen + 1):
        if i == 1:  # the first step moves the caches in and captures: not timed
            started = time.perf_counter()
        tokens = [[t] for t in shard.sample(shard(shard.embed(mx.array(tokens)), batch), seqs)]
    return round(gen * len(prompts) / (time.perf_counter() - started), 1)


def hf_greedy(model, prompts: list[list[int]], gen: int) -> tuple[list[list[int]], list]:
    """transformers' greedy tokens for a batch of equal-length prompts, and its scores."""
    ids = torch.tensor(prompts, device=model.device)
    with torch.no_grad():
        out = model.generate(  # no EOS: not stopped at, not suppressed (as ignore_eos)
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=gen,
            eos_token_id=None,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
        )
    return out.sequences[:, ids.shape[1] :].tolist(), out.scores


def divergence(want: list[int], got: list[int], scores, row: int) -> dict | None:
    """Where `got` first leaves `want`, and transformers' logits there: the top-2 margin
    and how far the token mlxring chose is below transformers' choice."""
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            logits = scores[i][row].float()
            top = logits.topk(2).values.tolist()
            return {
                "step": i,
                "transformers": a,
                "mlxring": b,
                "top2_margin": round(top[0] - top[1], 4),
                "chosen_gap": round(float(logits[a] - logits[b]), 4),
                "top_logit": round(top[0], 3),
            }
    return None


def token_check(model, shard, tokenizer, prompts, gen: int, mode: str) -> dict:
    """mlxring (`mode`) against transformers: each prompt alone, and the batch of 8."""
    solo_want, solo_got, firsts = [], [], []
    for p in prompts:
        (want,), scores = hf_greedy(model, [p], gen)
        _, (got,) = engine_run(shard, tokenizer, [p], gen, mode)
        solo_want.append(want)
        solo_got.append(got)
        firsts.append(divergence(want, got, scores, 0))
    batch_want, scores = hf_greedy(model, prompts, gen)
    _, batch_got = engine_run(shard, tokenizer, prompts, gen, mode)
    batch_firsts = [
        divergence(w, g, scores, i) for i, (w, g) in enumerate(zip(batch_want, batch_got))
    ]
    return {
        "solo_equal": sum(f is None for f in firsts),
        "solo_divergences": [f for f in firsts if f],
        "batch_equal": sum(f is None for f in batch_firsts),
        "batch_divergences": [f for f in batch_firsts if f],
        "hf_solo_vs_hf_batch_equal": sum(a == b for a, b in zip(solo_want, batch_want)),
        "prompts": len(prompts),
    }


def median(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for key in KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    out["aggregate_all_rounds"] = [r["aggregate_tok_s"] for r in rows]
    out["warmup_s"] = max(r.get("warmup_s", 0) for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="only the JSON line")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/torch_cuda.py needs a CUDA GPU (torch sees none)")
    if not (args.model / "config.json").exists():
        make_tiny("llama", args.model, **SHAPE)  # what `mlxring make-tiny` runs
    began = time.perf_counter()

    def say(*words) -> None:
        if not args.json:
            print(f"[{time.perf_counter() - began:6.1f} s]", *words, file=sys.stderr, flush=True)

    model_dir, gen = str(args.model), args.gen_tokens
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    device = (
        f"{name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformers {transformers.__version__}"
    )
    say(device)

    layers = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    shard = load_shard(model_dir, 0, layers, True, "torch", args.device, "float16")
    tokenizer = load_tokenizer(model_dir)
    gb_s = roofline.copy_gb_s({"backend": "torch", "device": args.device})
    roof = {
        "weight_bytes": shard.nbytes,
        "copy_gb_s": round(gb_s, 1),
        "step_ms": round(shard.nbytes / (gb_s * 1e9) * 1e3, 3),  # each weight byte read once
        "tok_s_batch1": round(gb_s * 1e9 / shard.nbytes, 1),
    }
    say(f"roofline: {roof}")
    runners, vocab = baselines.transformers_runners(model_dir, gen, args.device, "float16")
    prompts = synthetic_prompts(max(LEVELS), args.prompt_tokens, vocab)

    results: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for c in LEVELS:
            row = baselines.measure(runners["transformers-batch"], prompts[:c], "transformers")
            results.setdefault(("transformers", c), []).append(row)
            say(f"round {r} transformers c{c}: {row['aggregate_tok_s']} tok/s")
            for mode in MODES:
                if mode in SLOW and r >= args.slow_rounds:
                    continue
                row, _ = engine_run(shard, tokenizer, prompts[:c], gen, mode)
                results.setdefault((mode, c), []).append(row)
                say(
                    f"round {r} mlxring {mode} c{c}: {row['aggregate_tok_s']} tok/s "
                    f"(warm-up {row['warmup_s']} s; mode run: {shard.decoder.mode})"
                )
    rows = [median(v) for v in results.values()]
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    alone = {}
    for mode in ("compiled", "graphs"):
        shard.decoder.set_mode(mode)
        alone[mode] = {f"c{c}": shard_decode(shard, prompts[:c], gen) for c in LEVELS}
    say(f"shard alone: {alone} tok/s")

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).to(args.device)
    tokens = token_check(hf, shard, tokenizer, prompts, gen, MODES[0])
    say("tokens checked")

    def ratio(a: tuple, b: tuple, key: str = "aggregate_tok_s") -> float:
        return round(by[a][key] / by[b][key], 2)

    best = MODES[0]
    ratios = {
        "c1_decode_vs_roofline": round(by[best, 1]["per_request_tok_s"] / roof["tok_s_batch1"], 3),
        "c8_vs_transformers_b8": ratio((best, 8), ("transformers", 8)),
        "c1_vs_transformers_b1": ratio((best, 1), ("transformers", 1)),
        "graphs_c1_decode_vs_roofline": round(
            by["graphs", 1]["per_request_tok_s"] / roof["tok_s_batch1"], 3
        ),
        "graphs_c8_vs_transformers_b8": ratio(("graphs", 8), ("transformers", 8)),
        "compiled_vs_static_c1": ratio((best, 1), ("static", 1)),
    }
    report = {
        "device": device,
        "graphs_fallback": shard.decoder.fallback,
        "roofline": roof,
        "rows": rows,
        "shard_alone_tok_s": alone,
        "ratios": ratios,
        "tokens": tokens,
    }
    if not args.json:
        print(table(report))
    print(json.dumps(report))


def table(report: dict) -> str:
    roof = report["roofline"]
    lines = [
        f"device: {report['device']}",
        f"roofline: a step reads each of the {roof['weight_bytes'] / 1e9:.2f} GB of fp16 weights "
        f"once; at the device copy's {roof['copy_gb_s']} GB/s (bytes read plus written) that "
        f"takes {roof['step_ms']} ms: at most {roof['tok_s_batch1']} tok/s at batch 1",
        "",
        "| system | concurrency | aggregate tok/s | decode tok/s | per-request decode tok/s "
        "| of roofline | TTFT p50 ms | all rounds (aggregate) | warm-up s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        name = "transformers generate" if r["mode"] == "transformers" else f"mlxring, {r['mode']}"
        fraction = roofline.fraction(r["per_request_tok_s"], roof)
        cells = [
            name,
            r["concurrency"],
            r["aggregate_tok_s"],
            r["decode_tok_s"],
            r["per_request_tok_s"],
            f"{fraction:.0%}" if fraction is not None else "-",
            r["ttft_ms_p50"],
            " / ".join(f"{a:.1f}" for a in r["aggregate_all_rounds"]),
            r["warmup_s"],
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    lines.append(f"the shard alone (no engine): {report['shard_alone_tok_s']} tok/s")
    lines.append("; ".join(f"{k}: {v}" for k, v in report["ratios"].items()))
    t = report["tokens"]
    lines.append(
        f"greedy tokens vs transformers: {t['solo_equal']}/{t['prompts']} prompts equal alone, "
        f"{t['batch_equal']}/{t['prompts']} in the batch of 8"
    )
    for d in t["solo_divergences"] + t["batch_divergences"]:
        lines.append(f"  divergence: {d}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
