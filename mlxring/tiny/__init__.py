"""Tiny random-weight checkpoints of the real architectures, in Hugging Face layout.

Tests and the demo use these instead of downloading anything: transformers' own
model class with random weights, `save_pretrained` sharded into several
safetensors files with an index, and a small BPE tokenizer trained locally.
Needs the `torch` extra (torch + transformers).
"""

from __future__ import annotations

import importlib
from pathlib import Path

# family -> module of mlxring.tiny with `build(layers, hidden, intermediate, heads, layout)`
# returning a transformers model, and optionally `finish(out, layout)` run after saving
FAMILIES = {"llama": "llama", "gpt_oss": "gpt_oss", "gemma3": "gemma", "gemma4": "gemma"}
LAYOUTS = {"gpt_oss": ("transformers", "original", "original-mxfp4", "mlx-community",
                       "mlx-community-8bit", "mlx-community-4bit")}  # fmt: skip
VOCAB_SIZE = 384
# A larger init than transformers' default (0.02) keeps random logits far from
# flat, so greedy decoding is discriminating instead of repeating one token.
INIT_STD = 0.08
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CORPUS = """\
The ring splits the model into contiguous ranges of layers, one range per machine.
Hidden states travel around the ring and every hop is sealed with a fresh key.
Apple silicon machines share unified memory between the CPU and the GPU.
A continuous batching scheduler admits new requests between decode steps.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2048 appear in text too.
Hello, world! How are you today? I am fine, thank you. What is a llama?
"""


def make_tokenizer(out: Path):
    """Train a byte-level BPE on a small embedded corpus and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_tiny(
    family: str,
    out: str | Path,
    layers: int = 6,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    seed: int = 0,
    max_shard_size: str | None = None,
    layout: str | None = None,
) -> Path:
    """Write a random-weight `family` checkpoint to `out` and return the path.

    The checkpoint is split into several safetensors files (about 30 unless
    `max_shard_size` says otherwise) with a `model.safetensors.index.json`, as
    real ones are, so that loading a subset of layers can be tested.
    """
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if layout is not None and layout not in LAYOUTS.get(family, ()):
        raise ValueError(f"family {family!r} has no layout {layout!r}")
    module = importlib.import_module(f"mlxring.tiny.{FAMILIES[family]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = module.build(family, layers, hidden, intermediate, heads, layout)
    model = model.to(torch.float32).eval()
    if max_shard_size is None:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        max_shard_size = f"{max(40, total // 30 // 1000)}KB"
    model.save_pretrained(out, max_shard_size=max_shard_size)
    make_tokenizer(out)
    if hasattr(module, "finish"):
        module.finish(out, layout)
    return out
