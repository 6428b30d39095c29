"""Sampling on a torch head's device: only the chosen token ids come to the host.

The semantics are the mlx sampler's (`mlxring.shards.mlx_sample`): temperature 0 is
greedy (argmax); otherwise top-k, then top-p, on the log-probabilities, and a draw
at the temperature. Two differences, neither visible to greedy requests: top-p is
taken over the distribution renormalized after top-k, and seeded draws repeat on
the same torch device but are not the mlx sampler's draws for that seed. A seeded
sequence's draw for its n-th token uses a generator seeded from (seed, n), so a
request repeats whatever batch it shares; unseeded ones share one random stream.

Sequences are duck-typed: `.params` (temperature, top_p, top_k, seed, logit_bias,
logprobs) and `.tokens`; `.last_logprobs` is set for those that ask for logprobs.
"""

from __future__ import annotations

import secrets

import torch

MASK64 = (1 << 64) - 1


def step_seed(seed: int, n: int) -> int:
    """A 64-bit seed for draw `n` of a request seeded with `seed` (splitmix64)."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def biased(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """`logits` [B, vocab] plus each sequence's `logit_bias` (the mlx sampler's rule)."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logit_bias]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        tokens, values = zip(*seqs[i].params.logit_bias.items())
        index = torch.tensor(tokens, device=logits.device)
        logits[i, index] += torch.tensor(values, device=logits.device, dtype=logits.dtype)
    return logits


def report(logits: torch.Tensor, tokens: list[int], seqs: list) -> None:
    """`seq.last_logprobs` for the sequences that ask (`params.logprobs` = k): the token's
    log probability and the k likeliest (id, log probability); only those rows leave the
    device."""
    asked = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not asked:
        return
    rows = torch.log_softmax(logits[asked].float(), dim=-1)
    chosen = rows.gather(1, torch.tensor([[tokens[i]] for i in asked], device=rows.device))
    chosen = chosen[:, 0].tolist()
    most = max(seqs[i].params.logprobs for i in asked)
    top_lps, top_ids = rows.topk(most, dim=-1) if most else (rows[:, :0], rows[:, :0].long())
    top_lps, top_ids = top_lps.tolist(), top_ids.tolist()
    for r, i in enumerate(asked):
        k = seqs[i].params.logprobs
        seqs[i].last_logprobs = (chosen[r], list(zip(top_ids[r][:k], top_lps[r][:k])))


class TorchSampler:
    """One token per row of logits [B, vocab] on the device, per sequence's parameters."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seeded = torch.Generator(device=device)  # re-seeded for every seeded draw
        self.unseeded = torch.Generator(device=device)
        self.unseeded.manual_seed(secrets.randbits(63))

    def __call__(self, logits: torch.Tensor, seqs: list) -> list[int]:
        logits = biased(logits, seqs)
        greedy = logits.argmax(dim=-1)
        hot = [i for i, seq in enumerate(seqs) if seq.params.temperature > 0]
        if hot:
            greedy[hot] = self.draw(logits[hot].float(), [seqs[i] for i in hot])
        tokens = greedy.tolist()
        report(logits, tokens, seqs)
        return tokens

    def draw(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        """A token per row, each from its sequence's filtered, tempered distribution."""
        rows, vocab = logits.shape
        dev = logits.device
        params = [s.params for s in seqs]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_k = torch.tensor(top_k, device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        temperature = torch.tensor([p.temperature for p in params], device=dev)
        logprobs, order = torch.log_softmax(logits, dim=-1).sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        keep = rank < top_k[:, None]
        kept = torch.softmax(logprobs.masked_fill(~keep, float("-inf")), dim=-1)
        keep &= (kept.cumsum(dim=-1) - kept) < top_p[:, None]  # the smallest set past top_p
        scores = (logprobs / temperature[:, None]).masked_fill(~keep, float("-inf"))
        noise = torch.empty_like(scores)
        for r, seq in enumerate(seqs):
            generator = self.unseeded
            if seq.params.seed is not None:
                generator = self.seeded
                generator.manual_seed(step_seed(seq.params.seed, len(seq.tokens)))
            noise[r].exponential_(generator=generator)
        # argmax of p / E with E ~ Exp(1) draws from p (the Gumbel-max trick)
        pick = (scores - noise.clamp_min(1e-20).log()).argmax(dim=-1)
        return order.gather(1, pick[:, None])[:, 0]
