"""A tiny Llama that really calls a tool: trained here, in seconds, to answer one question
with one tool call and the tool's result with one sentence.

The checkpoint is transformers' LlamaForCausalLM (random init, then AdamW on two chat
turns rendered by its own template), saved with `save_pretrained`; the tokenizer is the
tiny BPE of `mlxring.tiny` plus the tool-call markers, and its chat template renders
`tools`, assistant `tool_calls` and `tool` results in the JSON tool-call format that
mlx-lm's `json_tools` parser reads (`<tool_call>{"name": …, "arguments": …}</tool_call>`).
Its generation_config declares the end-of-turn token `<|end|>` as an end token beside
`</s>`, as Llama 3's declares `<|eot_id|>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from mlxring.tiny.make import make_tokenizer

MARKERS = ["<tool_call>", "</tool_call>", "<|tool|>"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
QUESTION = "What is the weather in Paris?"
ARGUMENTS = {"city": "Paris"}
RESULT = "sunny, 21 C"
ANSWER = "It is sunny in Paris."

# the name and arguments of each call, as mlx-lm's json_tools parser reads them; a string
# of arguments (as OpenAI clients send them back) is written as it is
TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "<|end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>"
    "{% for call in m.tool_calls %}{% set tool_call = call.function %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": '
    "{% if tool_call.arguments is string %}{{ tool_call.arguments }}"
    "{% else %}{{ tool_call.arguments | tojson }}{% endif %}}</tool_call>"
    "{% endfor %}<|end|>"
    "{% elif m.role == 'tool' %}<|tool|>{{ m.content }}<|end|>"
    "{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def call_text() -> str:
    return f'<tool_call>{{"name": "get_weather", "arguments": {json.dumps(ARGUMENTS)}}}</tool_call>'


def turns() -> list[tuple[list[dict], str]]:
    """(messages, the reply the model learns), for both turns of the round trip."""
    asked = [{"role": "user", "content": QUESTION}]
    called = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)},
            }
        ],
    }
    answered = [*asked, called, {"role": "tool", "tool_call_id": "call_0", "content": RESULT}]
    return [(asked, call_text()), (answered, ANSWER)]


def make_tool_model(out: Path, steps: int = 300) -> Path:
    """Write the trained checkpoint to `out` (a few seconds on one core)."""
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_tokens(MARKERS)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    examples = []
    for messages, reply in turns():
        text = tokenizer.apply_chat_template(
            messages, tools=[WEATHER], add_generation_prompt=True, tokenize=False
        )
        prompt = tokenizer.encode(text, add_special_tokens=False)
        target = tokenizer.encode(reply, add_special_tokens=False) + [end]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        examples.append((ids, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend (seconds vs minutes)
    try:
        for step in range(steps):
            ids, labels = examples[step % len(examples)]
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, end]
    ).save_pretrained(out)
    return out
