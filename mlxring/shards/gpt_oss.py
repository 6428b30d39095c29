"""GPT-OSS on MLX, reusing mlx-lm's `models.gpt_oss`, from any of its three checkpoint layouts.

- transformers' `save_pretrained`: experts `gate_up_proj` [E, H, 2I] and
  `down_proj` [E, I, H] ([E, in, out]), no `.weight`; rope in `rope_parameters`.
- the hub release ("original"): experts [E, out, in], MXFP4 `_blocks`/`_scales`
  (or unquantized, no `.weight`); rope in `rope_theta`/`rope_scaling`.
- mlx-community: already sanitized by mlx-lm (`experts.gate_proj.weight`, ...).

mlx-lm's `sanitize` reads only the last two (and of the original only MXFP4):
unquantized experts are turned into [E, out, in] `.weight` tensors first.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.rope_utils import initialize_rope

from mlxring.model.facts import CheckpointError
from mlxring.shards.llama import LlamaShard

GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"


class GptOssShard(LlamaShard):
    """Llama-shaped (embed, layers, norm, lm_head); its own layer types, head and sanitize."""

    def __init__(self, model, config: dict, start: int, end: int, is_head: bool):
        super().__init__(model, config, start, end, is_head)
        set_rope(model, config)

    def sanitize(self, weights: dict) -> dict:
        """mlx-lm's sanitize, behind the expert-layout conversion it lacks."""
        return super().sanitize(experts_out_in(weights, self.model.args))

    @property
    def sliding(self) -> list[bool]:
        """Per local layer: sliding-window attention (mlx-lm fills in the default types)."""
        types = self.model.model.layer_types[self.start : self.end]
        return [t == "sliding_attention" for t in types]

    def logits(self, x: dict[str, mx.array]) -> mx.array:
        return self.model.lm_head(self.model.model.norm(x["h"]))


def set_rope(model, config: dict) -> None:
    """Use transformers 5's `rope_parameters` (yarn for gpt-oss), which mlx-lm ignores."""
    rope = config.get("rope_parameters")
    if not rope or "rope_scaling" in config:
        return
    args = model.args
    args.rope_theta = rope.get("rope_theta", args.rope_theta)
    args.rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    for layer in model.layers:
        layer.self_attn.rope = initialize_rope(
            args.head_dim, args.rope_theta, traditional=False, scaling_config=args.rope_scaling
        )


def experts_out_in(weights: dict, args) -> dict:
    """Unquantized expert matrices as [E, out, in] `.weight` tensors, which mlx-lm's sanitize reads.

    transformers stores them [E, in, out]. Whether a checkpoint does is read from
    the first expert matrix loaded, and every other one must agree: `gate_up_proj`
    decides unless 2I == H, then `down_proj` (I != H there).
    """
    hidden, inter = args.hidden_size, args.intermediate_size
    shapes = {  # (transformers, original) last two dims
        GATE_UP: ((hidden, 2 * inter), (2 * inter, hidden)),
        DOWN: ((inter, hidden), (hidden, inter)),
    }
    decider = DOWN if 2 * inter == hidden else GATE_UP
    names = sorted(k for k in weights if k.endswith((GATE_UP, DOWN)))
    first = next((k for k in names if k.endswith(decider)), None)
    if first is None:
        return weights
    if (shape := tuple(weights[first].shape[-2:])) not in shapes[decider]:
        raise CheckpointError(
            f"{first} has shape {tuple(weights[first].shape)}, which fits neither expert "
            f"layout for hidden_size {hidden} and intermediate_size {inter} in config.json"
        )
    transposed = shape == shapes[decider][0]
    out = dict(weights)
    for name in names:
        w = out.pop(name)
        want = shapes[GATE_UP if name.endswith(GATE_UP) else DOWN][0 if transposed else 1]
        if tuple(w.shape[-2:]) != want:
            layout = "transformers [E, in, out]" if transposed else "original [E, out, in]"
            raise CheckpointError(
                f"{name} has shape {tuple(w.shape)}, not the {layout} layout of {first}; "
                "the checkpoint mixes expert layouts"
            )
        out[f"{name}.weight"] = mx.contiguous(w.swapaxes(-1, -2)) if transposed else w
    return out
