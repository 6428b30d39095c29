"""A tiny GPT-OSS: alternating sliding/full attention with sinks, a top-2 MoE.

`finish` rewrites transformers' `save_pretrained` output into the layout a user
may have: "transformers" (as saved), "original" (the hub release: experts as
[E, out, in], "original-mxfp4" with MXFP4 `_blocks`/`_scales`) or
"mlx-community" (written by mlx-lm itself; "-8bit"/"-4bit" quantized by it).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import mlx.core as mx
import torch
from mlx.utils import tree_flatten
from mlx_lm.models import gpt_oss
from mlx_lm.utils import load_model, quantize_model, save_config
from transformers import GptOssConfig, GptOssForCausalLM

from mlxring.tiny import INIT_STD, VOCAB_SIZE

INDEX = "model.safetensors.index.json"
# layout -> mlx-lm quantization of the mlx-community layout (None: unquantized)
MLX_COMMUNITY = {
    "mlx-community": None,
    "mlx-community-8bit": {"group_size": 32, "bits": 8},
    "mlx-community-4bit": {"group_size": 32, "bits": 4},
}
LAYOUTS = ("transformers", "original", "original-mxfp4", *MLX_COMMUNITY)
# As the hub release: the experts are MXFP4, everything else stays unquantized.
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def build(
    family: str, layers: int, hidden: int, intermediate: int | None, heads: int, layout: str | None
):

    config = GptOssConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        # 1.5 × hidden: 2I != H and I != H tell the expert layouts apart, and
        # I stays a multiple of 32 so MXFP4 and group-32 quantization fit.
        intermediate_size=intermediate or 3 * hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,  # shorter than the test prompts
        max_position_embeddings=4096,
        # gpt-oss's yarn rope, but truncated: mlx-lm's YarnRoPE always floors/ceils
        # the correction range, transformers (and the release, truncate=False)
        # need not. Truncated, both compute the same function.
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": True,
        },
        initializer_range=INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = GptOssForCausalLM(config)
    # transformers zeroes the biases and sets the norms to one: randomize them
    # too, so a bias or norm loaded wrongly changes the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, INIT_STD)
            elif name.endswith("norm.weight"):
                p.normal_(1.0, INIT_STD)
    return model


def finish(out: Path, layout: str | None) -> None:
    """Rewrite the saved checkpoint in `out` into `layout` (None: as transformers saved it)."""
    layout = layout or "transformers"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown gpt_oss layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "transformers":
        return
    to_original(out, mxfp4=layout == "original-mxfp4")
    if layout in MLX_COMMUNITY:
        to_mlx_community(out, MLX_COMMUNITY[layout])


def to_original(out: Path, mxfp4: bool = False) -> None:
    """Experts to [E, out, in] (MXFP4 blocks/scales if `mxfp4`); config as the hub has it."""

    def convert(name: str, w: mx.array) -> dict[str, mx.array]:
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {name: w}
        w = mx.contiguous(w.swapaxes(-1, -2))  # [E, in, out] -> [E, out, in]
        if not mxfp4:
            return {name: w}
        packed, scales = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        blocks = packed.view(mx.uint8).reshape(*w.shape[:-1], -1, 16)
        return {f"{name}_blocks": blocks, f"{name}_scales": scales}

    rewrite(out, convert)
    config = json.loads((out / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.pop("rope_theta", 150000.0)
    config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if mxfp4:
        config["quantization_config"] = MXFP4_CONFIG
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def rewrite(out: Path, convert) -> None:
    """Apply `convert(name, array) -> {name: array}` to every tensor, file by file."""

    index = json.loads((out / INDEX).read_text())
    weight_map = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, w in mx.load(str(out / file)).items():
            tensors.update(convert(name, w))
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    index["weight_map"] = dict(sorted(weight_map.items()))
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def to_mlx_community(out: Path, quantization: dict | None) -> None:
    """Load the original-layout checkpoint with mlx-lm, quantize and save it as mlx-lm does."""

    model, config = mlx_lm_model(out)
    if quantization:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints bits per weight
            model, config = quantize_model(model, config, **quantization)
    weights = dict(tree_flatten(model.parameters()))
    for file in out.glob("model*.safetensors"):
        file.unlink()
    # mlx-lm writes 5 GB files; a file per layer keeps the tiny checkpoint multi-file.
    files: dict[str, dict[str, mx.array]] = {}
    for name, w in weights.items():
        part = name.split(".")[2] if ".layers." in name else "head"
        files.setdefault(part, {})[name] = w
    weight_map = {}
    for i, (_, tensors) in enumerate(sorted(files.items()), start=1):
        file = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(tensors, file))
    total = sum(w.nbytes for w in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=4))
    save_config(config, out / "config.json")


def mlx_lm_model(path: Path):
    """mlx-lm's own full model and config of an original or mlx-community checkpoint.

    mlx-lm's `sanitize` reads unquantized original experts only when named
    `.weight`; this adds the suffix (nothing else) and lets mlx-lm do the rest.
    """

    class Model(gpt_oss.Model):
        def sanitize(self, weights):
            suffixed = {
                f"{k}.weight" if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else k: v
                for k, v in weights.items()
            }
            return super().sanitize(suffixed)

    return load_model(Path(path), get_model_classes=lambda config: (Model, gpt_oss.ModelArgs))
