"""Tiny random-weight checkpoints of the real architectures, in Hugging Face layout.

Tests and the demo use these instead of downloading anything: transformers' own
model class with random weights, `save_pretrained` sharded into several
safetensors files with an index, and a small BPE tokenizer trained locally.
Needs the `torch` extra (torch + transformers).
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama",)
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


def llama_config(layers: int, hidden: int, intermediate: int | None, heads: int) -> dict:
    """Keyword arguments of a small `LlamaConfig` (GQA, untied head)."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


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
) -> Path:
    """Write a random-weight `family` checkpoint to `out` and return the path.

    The checkpoint is split into several safetensors files (about 30 unless
    `max_shard_size` says otherwise) with a `model.safetensors.index.json`, as
    real ones are, so that loading a subset of layers can be tested.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(**llama_config(layers, hidden, intermediate, heads))
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    if max_shard_size is None:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        max_shard_size = f"{max(40, total // 30 // 1000)}KB"
    model.save_pretrained(out, max_shard_size=max_shard_size)
    make_tokenizer(out)
    return out
