"""Tiny random-weight checkpoints of the real architectures, in Hugging Face layout.

Tests and the demo use these instead of downloading anything: transformers' own
model class with random weights, `save_pretrained` sharded into several
safetensors files with an index, and a small BPE tokenizer trained locally.
The factory (`mlxring.tiny.make.make_tiny`) needs the `torch` extra (torch +
transformers); this module holds only what the CLI lists, so it loads neither.
"""

from __future__ import annotations

# family -> module of mlxring.tiny with `build(layers, hidden, intermediate, heads, layout)`
# returning a transformers model, and optionally `finish(out, layout)` run after saving
FAMILIES = {"llama": "llama", "gpt_oss": "gpt_oss", "gemma3": "gemma", "gemma4": "gemma"}
LAYOUTS = {
    "gpt_oss": (
        "transformers",
        "original",
        "original-mxfp4",
        "mlx-community",
        "mlx-community-8bit",
        "mlx-community-4bit",
    )
}
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
