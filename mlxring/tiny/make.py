"""Write a tiny random-weight checkpoint: transformers' model class, `save_pretrained`
sharded with an index, and a small BPE tokenizer trained on an embedded corpus."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlxring.tiny import CHAT_TEMPLATE, CORPUS, FAMILIES, LAYOUTS, SPECIAL_TOKENS, VOCAB_SIZE


def make_tokenizer(out: Path):
    """Train a byte-level BPE on a small embedded corpus and save it with a chat template."""

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
