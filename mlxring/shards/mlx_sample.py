"""Sampling on an mlx head: one token per row of logits, with each sequence's parameters.

Sequences are duck-typed: `.params` (temperature, top_p, top_k, logit_bias,
logprobs) and `.key`, the request's PRNG state (`mlxring.engine.request.Sequence`),
advanced by every draw; `.last_logprobs` is set for those that ask for logprobs.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p


def biased(logits: mx.array, seqs: list) -> mx.array:
    """`logits` [B, vocab] plus each sequence's `logit_bias` (as mlx-lm's processor adds it)."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logit_bias]
    if not rows:
        return logits
    bias = mx.zeros(logits.shape, dtype=logits.dtype)
    for i in rows:
        tokens, values = zip(*seqs[i].params.logit_bias.items())
        bias[i, mx.array(tokens)] = mx.array(values, dtype=logits.dtype)
    return logits + bias


def report(logprobs: mx.array, tokens: list[int], seqs: list) -> None:
    """For each sequence that asked (`params.logprobs` = k), its token's log probability
    and the k likeliest (id, log probability), most likely first, as `seq.last_logprobs`."""
    asked = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not asked:
        return
    rows = logprobs[mx.array(asked)].astype(mx.float32)
    most = max(seqs[i].params.logprobs for i in asked)
    order = mx.argsort(-rows, axis=-1)[:, :most] if most else None
    chosen = rows[mx.arange(len(asked)), mx.array([tokens[i] for i in asked])]
    chosen = chosen.tolist()
    top_ids = order.tolist() if most else [[] for _ in asked]
    top_lps = mx.take_along_axis(rows, order, axis=-1).tolist() if most else top_ids
    for r, i in enumerate(asked):
        k = seqs[i].params.logprobs
        seqs[i].last_logprobs = (chosen[r], list(zip(top_ids[r][:k], top_lps[r][:k])))


def sample(logits: mx.array, seqs: list) -> list[int]:
    """One token per row of `logits` [B, vocab], with each sequence's own parameters."""

    logits = biased(logits, seqs)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    greedy = mx.argmax(logprobs, axis=-1)
    out = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0:
            out.append(greedy[i])
            continue
        row = logprobs[i : i + 1]
        if 0 < p.top_k < row.shape[-1]:
            row = apply_top_k(row, p.top_k)
        if p.top_p < 1.0:
            row = apply_top_p(row, p.top_p)
        seq.key, sub = mx.random.split(seq.key)
        out.append(mx.random.categorical(row * (1 / p.temperature), key=sub)[0])
    tokens = [int(t) for t in mx.stack(out).tolist()] if out else []
    report(logprobs, tokens, seqs)
    return tokens
