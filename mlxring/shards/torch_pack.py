"""Linear layers on a CPU with their weights packed once for oneDNN.

A decode step's products have a few rows (the batch) against a large weight. torch's
default CPU path for `F.linear` (MKL's GEMM) handles such a skinny product at about
half the speed of oneDNN's (mkldnn's) inner-product kernel working on a weight
reordered once into its blocked layout: 16 products of 4 Llama layers (hidden 768),
one thread, batch 4, about 19 -> 8 ms; batch 8, 23 -> 12 ms; batch 1 about the same
(`python bench/cpu_linear.py`, bench/RESULTS.md). torch's own compiler emits the same
op (`mkldnn._linear_pointwise`) for frozen CPU models; here it is used eagerly.

`pack(layer)` replaces every `nn.Linear` in a decoder layer (the fused groups' ones
included) by a `PackedLinear`. The dense weight is dropped (memory does not grow); the
module keeps the weight's shape and dtype as a meta tensor, for code that reads them.
Packing applies to float32 weights on a CPU whose torch has oneDNN; anything else keeps
`nn.Linear`. `MLXRING_TORCH_PACK=0` turns it off (to compare).
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from torch import nn

PACK_ENV = "MLXRING_TORCH_PACK"
# the batch the layout is chosen for; measured: 1 to 64 all within noise of each other
PACK_BATCH = 4


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether layers on `device` in `dtype` get packed weights."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and os.environ.get(PACK_ENV, "1") != "0"
        and _packs_here()
    )


@functools.cache
def _packs_here() -> bool:
    """This torch packs and multiplies a weight (a build without oneDNN, or a oneDNN
    without these ops on this CPU, keeps nn.Linear; said once on stderr)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        linear = nn.Linear(8, 8, bias=False)
        x = torch.ones(2, 8)
        got = PackedLinear(linear)(x)
        ok = torch.allclose(got, linear(x).detach(), atol=1e-5)
    except RuntimeError as e:
        ok, why = False, str(e).splitlines()[0]
    else:
        why = "its products differ from torch's own"
    if not ok:
        print(f"mlxring: torch linears stay unpacked ({why})", file=sys.stderr)
    return ok


class PackedLinear(nn.Module):
    """y = x W^T + b, with W in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH)
        self.bias = linear.bias
        self.nbytes = weight.nbytes  # what the packed weight holds, as `parameters` would
        self._like = torch.empty(weight.shape, dtype=weight.dtype, device="meta")

    @property
    def weight(self) -> torch.Tensor:
        """The weight's shape and dtype (a meta tensor: the values live in `packed`)."""
        return self._like

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack(layer: nn.Module) -> list[PackedLinear]:
    """Every `nn.Linear` under `layer` replaced by a `PackedLinear`; the new modules."""
    packed = []
    for module in list(layer.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                one = PackedLinear(child)
                setattr(module, name, one)
                packed.append(one)
    return packed
