"""Fused projections: one matrix product where a decoder layer computes several of one input.

transformers' layers compute q, k and v (and the MLP's gate and up) as separate
products of the same hidden states. In a decode step each is a matrix-vector
product that reads its weight once; the small ones stay far below the memory
bandwidth and every one is a kernel of its own. `fuse` concatenates each group's
weights into one `FusedLinear` (the separate weights are dropped, so memory does
not grow) and puts a `Part` where each projection was: the first part called on
an input computes the whole product, the others take their slice of it. A part
checks that its input is the very tensor the product was computed from, so a
layer that projects different inputs still gets its own (computed again).
`forget` drops the remembered product once the layer is done.
"""

from __future__ import annotations

import torch
from torch import nn

GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class FusedLinear(nn.Module):
    """The linears of a group stacked into one `linear` [sum of outputs, inputs] (an
    nn.Linear, or on a CPU its packed form, `mlxring.shards.torch_pack`)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        first = linears[0]
        self.linear = nn.Linear(
            first.in_features,
            sum(m.out_features for m in linears),
            bias=first.bias is not None,
            device="meta",
        )
        weight = torch.cat([m.weight.detach() for m in linears])
        self.linear.weight = nn.Parameter(weight, requires_grad=False)
        if first.bias is not None:
            bias = torch.cat([m.bias.detach() for m in linears])
            self.linear.bias = nn.Parameter(bias, requires_grad=False)
        self.sizes = [m.out_features for m in linears]
        self.last: tuple | None = None  # (the input, its parts) until `forget`

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.last is None or self.last[0] is not x:
            self.last = (x, self.linear(x).split(self.sizes, dim=-1))
        return self.last[1]

    def forget(self) -> None:
        self.last = None


class Part(nn.Module):
    """Stands where one linear of a fused group was: its slice of the group's product."""

    def __init__(self, fused: FusedLinear, index: int, linear: nn.Linear):
        super().__init__()
        self.index = index
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group = [fused]  # a list: the group belongs to the parent module, not to a part

    @property
    def weight(self) -> torch.Tensor:
        """This projection's rows of the fused weight (a view)."""
        fused = self.group[0]
        start = sum(fused.sizes[: self.index])
        return fused.weight[start : start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group[0].parts(x)[self.index]


def fusable(linears: list) -> bool:
    first = linears[0]
    return all(
        type(m) is nn.Linear
        and m.in_features == first.in_features
        and m.weight.dtype == first.weight.dtype
        and (m.bias is None) == (first.bias is None)
        for m in linears
    )


def fuse(layer: nn.Module) -> list[FusedLinear]:
    """Fuse every group of projections found in `layer`'s modules; the fused groups."""
    fused = []
    for module in list(layer.modules()):
        for fused_name, group in GROUPS.items():
            linears = [getattr(module, name, None) for name in group]
            if not fusable(linears):
                continue
            one = FusedLinear(linears)
            setattr(module, fused_name, one)
            for i, (name, linear) in enumerate(zip(group, linears)):
                setattr(module, name, Part(one, i, linear))
            fused.append(one)
    return fused
