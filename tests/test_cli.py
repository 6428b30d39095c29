"""The `mlxring` command line, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.model.tokenizer import encode_prompt, hidden_ids, load_tokenizer

PROMPT = "Tell me about the ring"


def mlxring(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mlxring", *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mlxring {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("raw", [False, True])
def test_generate_greedy_equals_mlx_lm_generate_step(tiny_llama, raw):
    model, tokenizer = mlx_lm_load(str(tiny_llama))
    prompt = encode_prompt(tokenizer, PROMPT, raw)
    steps = generate_step(mx.array(prompt), model, max_tokens=24)
    want = [int(token) for token, _ in steps]

    args = ["--raw"] if raw else []
    out = mlxring(
        "generate",
        "--model",
        str(tiny_llama),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "24",
        "--json",
        *args,
    )
    result = json.loads(out.stdout)
    assert result["tokens"][: len(want)] == want
    assert result["prompt_tokens"] == len(prompt)
    # as mlx-lm's server: end and special tokens add no text (mlxring.model.tokenizer)
    hidden = hidden_ids(load_tokenizer(tiny_llama))
    assert result["text"] == tokenizer.decode([t for t in result["tokens"] if t not in hidden])


def test_generate_sampling_is_seeded(tiny_llama):
    def run(seed: str) -> list[int]:
        args = ["--temp", "1.5", "--top-p", "0.9", "--seed", seed, "--max-tokens", "16"]
        out = mlxring("generate", "--model", str(tiny_llama), "--prompt", PROMPT, "--json", *args)
        return json.loads(out.stdout)["tokens"]

    assert run("1") == run("1")
    assert run("1") != run("2")


def test_generate_streams_text_then_the_summary_on_stderr(tiny_llama):
    out = mlxring("generate", "--model", str(tiny_llama), "--prompt", "hi", "--max-tokens", "8")
    plain = out.stdout.strip()
    args = ["--prompt", "hi", "--max-tokens", "8", "--json", "--log-level", "warning"]
    as_json = mlxring("generate", "--model", str(tiny_llama), *args)
    result = json.loads(as_json.stdout)
    assert plain == result["text"].strip()
    # as mlx_lm.generate prints it, on stderr: stdout keeps only the text
    prompt, generated = result["prompt_tokens"], len(result["tokens"])
    summary = out.stderr.splitlines()
    assert summary[0] == "=" * 10 and len(summary) == 4, out.stderr
    assert re.fullmatch(rf"Prompt: {prompt} tokens, [0-9.]+ tokens-per-sec", summary[1])
    assert re.fullmatch(rf"Generation: {generated} tokens, [0-9.]+ tokens-per-sec", summary[2])
    assert re.fullmatch(r"Peak memory: [0-9.]+ GB \(mlx\)", summary[3])
    assert result["peak_memory_bytes"] > 0
    assert as_json.stderr == ""  # --log-level warning: no summary


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/nonexistent", "--prompt", "x"], "no such directory"),
        (["plan", "/nonexistent.yaml"], "nonexistent.yaml"),
        (["generate", "--model", "{model}", "--prompt", "x", "--max-tokens", "0"], ">= 1"),
    ],
)
def test_user_errors_are_one_line(tiny_llama, args, message):
    args = [a.format(model=tiny_llama) for a in args]
    proc = mlxring(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_plan_table_and_json(tiny_llama, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "name: t\nnodes:\n"
        "  - {name: a, host: localhost, memory_gb: 64, reserve_gb: 0}\n"
        "  - {name: b, host: localhost, memory_gb: 32, reserve_gb: 0}\n"
        "  - {name: c, host: localhost, memory_gb: 16, reserve_gb: 0}\n"
    )
    out = json.loads(mlxring("plan", str(config), "--model", str(tiny_llama), "--json").stdout)
    assert out["num_layers"] == 6
    assert [n["layers"] for n in out["nodes"]] == [[0, 2], [3, 4], [5, 5]]  # inclusive
    assert [n["layers_text"] for n in out["nodes"]] == ["0-2", "3-4", "5-5"]
    assert [n["name"] for n in out["nodes"]] == ["a", "b", "c"]
    table = mlxring("plan", str(config), "--model", str(tiny_llama)).stdout
    assert "0-2 (3)" in table and "3-4 (2)" in table and "5-5 (1)" in table


def test_plan_model_that_does_not_fit(tiny_llama, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "name: t\nnodes:\n"
        "  - {name: a, host: localhost, memory_gb: 0.0004, reserve_gb: 0}\n"
        "  - {name: b, host: localhost, memory_gb: 0.0001, reserve_gb: 0}\n"
    )
    proc = mlxring("plan", str(config), "--model", str(tiny_llama), check=False)
    assert proc.returncode == 2
    assert "does not fit" in proc.stderr and "'b' is short by" in proc.stderr


def test_keygen_writes_a_private_key_and_will_not_overwrite(tmp_path):
    path = tmp_path / "k" / "cluster.key"
    out = mlxring("keygen", "--out", str(path))
    assert "wrote a new cluster key" in out.stdout
    assert oct(path.stat().st_mode & 0o777) == "0o600" and len(path.read_text().strip()) == 64
    again = mlxring("keygen", "--out", str(path), check=False)
    assert again.returncode == 2 and "pass --force" in again.stderr
    assert mlxring("keygen", "--out", str(path), "--force").returncode == 0


def test_launch_warns_when_the_api_is_open_without_keys(tiny_llama, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "name: t\napi: {host: 0.0.0.0}\nnodes:\n  - {name: a, host: localhost, memory_gb: 8}\n"
    )
    out = mlxring("launch", str(config), "--model", str(tiny_llama), "--dry-run")
    assert "warning: the API will listen on 0.0.0.0:8000 without API keys" in out.stderr
    config.write_text(config.read_text().replace("0.0.0.0}", "0.0.0.0, api_keys: [k1]}"))
    out = mlxring("launch", str(config), "--model", str(tiny_llama), "--dry-run")
    assert "warning" not in out.stderr
