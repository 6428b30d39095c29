"""Which layers must share a stage: Gemma 4's KV sharing, read from config.json alone.

Pure (no mlx, no mlx-lm): the planner calls it before anything is loaded.
"""

from __future__ import annotations

GEMMA4_TYPES = ("gemma4", "gemma4_text")
GEMMA4_KV_SHARED, GEMMA4_PATTERN = 20, 5  # mlx-lm's defaults where config.json is silent


def kv_sharing_pairs(config: dict) -> list[tuple[int, int]]:
    """(source, sharer) layer pairs of a Gemma 4 config.json: `sharer` reuses `source`'s K/V.

    The last `num_kv_shared_layers` layers share; each reuses the last unshared
    layer of its own attention type, as mlx-lm and transformers do. Missing
    fields take mlx-lm's defaults. Empty for other model types. Pure: no mlx.
    """
    if config.get("model_type") not in GEMMA4_TYPES:
        return []
    config = config.get("text_config") or config
    num_layers = int(config["num_hidden_layers"])
    first_shared = num_layers - int(config.get("num_kv_shared_layers", GEMMA4_KV_SHARED))
    if first_shared <= 0:
        return []
    types = config.get("layer_types")
    if types is None:
        pattern = int(config.get("sliding_window_pattern", GEMMA4_PATTERN))
        types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    source = {types[i]: i for i in range(first_shared)}  # the last one of each type wins
    return [(source[types[j]], j) for j in range(first_shared, num_layers)]
