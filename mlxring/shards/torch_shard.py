"""The torch shard: one contiguous range of a transformers model's layers, on CPU or CUDA.

Nodes without Apple Silicon compute with torch; the ring stays mlx.distributed.
A shard builds transformers' own causal-LM class on the meta device (nothing is
allocated), keeps only its own decoder layers (and, on the head, the embedding,
final norm and lm_head), reads only its own tensors from the checkpoint, and
runs transformers' decoder-layer modules with its own KV caches
(`mlxring.shards.torch_cache`), positions and masks, so batched steps work as
on the MLX shards.

The contract is the MLX shards' one (`mlxring.shards.base.Shard`): tensors from
the ring arrive as mx arrays (in whatever dtype the previous stage computed in)
and are converted to this node's device and dtype on arrival; `__call__` returns
torch tensors on the device, and only `depart` brings them to the host (pinned,
one copy per tensor) as mx arrays for the wire. A head samples on its device
(`mlxring.shards.torch_sample`): only token ids come to the host. Decode steps of
a group run at fixed addresses, as CUDA graphs on a GPU (`mlxring.shards.torch_static`).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mlxring.model.facts import CheckpointError, ModelFacts
from mlxring.model.weights import belongs, weight_map
from mlxring.shards.torch_cache import LayerCaches, TorchKVCache, attention_mask, positions
from mlxring.shards.torch_fuse import fuse
from mlxring.shards.torch_pack import PackedLinear, pack, packable
from mlxring.shards.torch_sample import TorchSampler
from mlxring.shards.torch_static import StaticDecoder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda")
# where multimodal checkpoints keep the text model
_TEXT_PREFIX = re.compile(r"^(?:model\.language_model\.|language_model\.model\.)")
_TEXT_HEAD = re.compile(r"^language_model\.lm_head\.")


class Absent(nn.Module):
    """Stands where a layer or head module of another stage would be; holds nothing."""


def to_torch(x: mx.array, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An mx array as a torch tensor on `device` (floating point converted to `dtype`)."""
    if x.dtype == mx.bfloat16:
        t = torch.from_numpy(np.array(x.view(mx.uint16), copy=True)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.array(x, copy=True))
    t = t.to(device=device)  # then convert: the copy moves the sender's (maybe fewer) bytes
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def to_mx(t: torch.Tensor) -> mx.array:
    """A torch tensor (on the host) as an mx array, in the same dtype."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.uint16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def to_host(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Device tensors copied to the host: into pinned buffers, all copies queued, one wait."""
    out = {}
    for k, v in x.items():
        if v.device.type != "cuda":
            out[k] = v
            continue
        out[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        out[k].copy_(v, non_blocking=True)
    if len(out) and any(v.device.type == "cuda" for v in x.values()):
        torch.cuda.current_stream().synchronize()
    return out


def resolve_dtype(name: str | None, facts: ModelFacts) -> torch.dtype:
    """A node's dtype: its `dtype` setting, or ("auto") the checkpoint's own."""
    if name in (None, "auto"):
        name = facts.dtype
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """A node's torch device: its `device` setting (cpu by default), if torch can use it."""
    name = name or "cpu"
    if name not in DEVICES:
        raise CheckpointError(f"torch device {name!r} is not supported; use cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device cuda: torch sees no CUDA GPU on this node")
    return torch.device(name)


class TorchShard:
    """Layers [start, end) of a transformers model; the head also embeds and projects."""

    # modules of the head only, as attribute paths from the causal LM
    HEAD_MODULES = ("model.embed_tokens", "model.norm", "lm_head")

    def __init__(
        self,
        model: nn.Module,
        start: int,
        end: int,
        is_head: bool,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.model, self.config = model, model.config
        self.start, self.end, self.is_head = start, end, is_head
        self.device, self.dtype = device, dtype
        self.inner = model.model
        self.layers = {i: self.inner.layers[i] for i in range(start, end)}
        types = getattr(self.config, "layer_types", None) or ["full_attention"] * self.num_layers
        self.types = {i: types[i] for i in range(start, end)}
        rope_params = inspect.signature(self.inner.rotary_emb.forward).parameters
        self.rope_by_type = "layer_type" in rope_params
        self.windows = {  # per attention kind: its sliding window (None: full)
            kind: self.config.sliding_window if kind == "sliding_attention" else None
            for kind in sorted(set(self.types.values()))
        }
        self.fused: dict[int, list] = {i: [] for i in self.layers}  # per layer, `fuse_layers`
        self.decoder = StaticDecoder(self)  # the decode mode: device's, or MLXRING_TORCH_DECODE
        self.sampler = TorchSampler(device) if is_head else None

    @property
    def num_layers(self) -> int:
        """The whole model's layer count (not this shard's)."""
        return self.config.num_hidden_layers

    # loading --------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        start: int,
        end: int,
        is_head: bool,
        device: str | None = None,
        dtype: str | None = None,
    ) -> TorchShard:
        """Build the shard for layers [start, end) and load its weights from `model_dir`."""

        model_dir = Path(model_dir)
        facts = ModelFacts.read(model_dir)
        if facts.quantized:
            raise CheckpointError(
                f"{model_dir}: quantized checkpoints run on the mlx backend only; "
                "the torch backend needs the unquantized (transformers) checkpoint"
            )
        torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype, facts)
        config = AutoConfig.from_pretrained(model_dir).get_text_config()
        num_layers = config.num_hidden_layers
        if not 0 <= start < end <= num_layers:
            raise CheckpointError(
                f"layers {start}-{end - 1} are out of range: the model has {num_layers} "
                f"layers (0-{num_layers - 1})"
            )
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        config._attn_implementation = "sdpa" if model_class._supports_sdpa else "eager"
        with torch.device("meta"):
            model = model_class(config)
        for i in range(num_layers):
            if not start <= i < end:
                model.model.layers[i] = Absent()
        if not is_head:
            for path in cls.HEAD_MODULES:
                parent, _, name = path.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                if getattr(owner, name, None) is not None:
                    setattr(owner, name, Absent())
        model.to_empty(device=torch_device)
        with torch.device(torch_device):  # rotary frequencies are not in the checkpoint
            model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        shard = cls(model, start, end, is_head, torch_device, torch_dtype)
        shard.load_weights(model_dir)
        shard.fuse_layers()
        if packable(torch_device, torch_dtype):
            shard.pack_layers()
        model.eval()
        return shard

    def fuse_layers(self) -> None:
        """q/k/v and gate/up of each local layer as one product each (`torch_fuse`)."""
        self.fused = {i: fuse(layer) for i, layer in self.layers.items()}

    def pack_layers(self) -> None:
        """The local layers' linears with weights packed for a CPU (`torch_pack`)."""
        for layer in self.layers.values():
            pack(layer)

    def checkpoint_name(self, name: str) -> str | None:
        """The model's name for checkpoint tensor `name`, or None if it is not this shard's."""
        if not belongs(name, self.start, self.end, self.is_head):
            return None
        return _TEXT_HEAD.sub("lm_head.", _TEXT_PREFIX.sub("model.", name))

    def load_weights(self, model_dir: Path) -> None:
        """Read this shard's tensors from `model_dir` into the model, checking names and shapes."""

        files: dict[str, list[tuple[str, str]]] = {}
        for name, file in weight_map(model_dir).items():
            if (mine := self.checkpoint_name(name)) is not None:
                files.setdefault(file, []).append((name, mine))
        state = {}
        for file, names in sorted(files.items()):
            with safe_open(str(model_dir / file), framework="pt", device="cpu") as f:
                for name, mine in names:
                    t = f.get_tensor(name)
                    t = t.to(self.dtype) if t.is_floating_point() else t
                    state[mine] = t.to(self.device)
        ignored = getattr(self.inner, "_keys_to_ignore_on_load_unexpected", None) or []
        state = {
            k: v
            for k, v in state.items()
            if not any(re.search(p, k.removeprefix("model.")) for p in ignored)
        }
        if self.is_head and self.config.tie_word_embeddings and "lm_head.weight" not in state:
            state["lm_head.weight"] = state.get("model.embed_tokens.weight")
        expected = dict(self.model.state_dict(keep_vars=True))
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{model_dir}: weights do not match the model "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        for name, value in state.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{model_dir}: {name} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(expected[name].shape)}"
                )
        self.model.load_state_dict(state, strict=True, assign=True)
        if self.is_head and self.config.tie_word_embeddings:
            self.model.lm_head.weight = self.inner.embed_tokens.weight
        self.fix_buffers()

    def fix_buffers(self) -> None:
        """Non-persistent buffers left empty by the meta build (embedding scales)."""
        for module in self.model.modules():
            if hasattr(module, "scalar_embed_scale"):
                module.embed_scale = torch.tensor(module.scalar_embed_scale, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights this shard holds."""
        packed = sum(m.nbytes for m in self.model.modules() if isinstance(m, PackedLinear))
        return packed + sum(p.nbytes for p in self.model.parameters())

    # the shard contract -----------------------------------------------------
    def arrive(self, x: dict) -> dict[str, torch.Tensor]:
        """Tensors from the ring (mx arrays) on this node's device and dtype."""
        return {
            k: v if isinstance(v, torch.Tensor) else to_torch(v, self.device, self.dtype)
            for k, v in x.items()
        }

    @torch.no_grad()
    def embed(self, tokens: mx.array) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.array(tokens, dtype=np.int64)).to(self.device)  # one copy
        return {"h": self.inner.embed_tokens(ids).to(self.dtype)}

    def make_cache(self) -> list[TorchKVCache]:
        """One cache per local layer."""
        return [TorchKVCache() for _ in self.layers]

    def layer_inputs(self, h: torch.Tensor, cache: list[TorchKVCache]) -> dict[str, dict]:
        """Per layer type, the keyword arguments its decoder layers take for this step.

        Positions come from the first cache: every local layer has seen the same tokens.
        """
        new = h.shape[1]
        pos = positions(cache[0], new, self.device)
        masks = {
            kind: attention_mask(cache[0], new, window, h.dtype, self.device)
            for kind, window in self.windows.items()
        }
        return self.layer_kwargs(h, pos, masks, LayerCaches(dict(zip(self.layers, cache))))

    def layer_kwargs(self, h: torch.Tensor, pos, masks: dict, view) -> dict[str, dict]:
        """Per layer type, its decoder layers' keyword arguments for positions `pos` [B, T]."""
        inputs = {}
        for kind in self.windows:
            by_type = (kind,) if self.rope_by_type else ()
            inputs[kind] = {
                "position_embeddings": self.inner.rotary_emb(h, pos, *by_type),
                "attention_mask": masks[kind],
                "position_ids": pos,
                "past_key_values": view,
            }
        return inputs

    @torch.no_grad()
    def __call__(self, x: dict, cache: list[TorchKVCache]) -> dict[str, torch.Tensor]:
        x = self.arrive(x)
        if self.decoder.applies(x, cache):  # a decode group's step: static cache, graphs
            return self.decoder(x, cache)
        return self.run(x, self.layer_inputs(x["h"], cache))

    def run(self, x: dict[str, torch.Tensor], inputs: dict[str, dict]) -> dict[str, torch.Tensor]:
        """The local layers on `x` with `inputs` (per layer type, from `layer_kwargs`)."""
        h = x["h"]
        for i, layer in self.layers.items():
            h = layer(h, **inputs[self.types[i]])
            for group in self.fused[i]:
                group.forget()
        return {"h": h}

    def depart(self, x: dict) -> dict[str, mx.array]:
        """To the host and into mx arrays, in this node's dtype."""
        host = to_host({k: v for k, v in x.items() if isinstance(v, torch.Tensor)})
        return {k: to_mx(host[k]) if k in host else v for k, v in x.items()}

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head (and softcap) on the device, float32."""
        out = self.model.lm_head(self.inner.norm(h))
        if cap := getattr(self.config, "final_logit_softcapping", None):
            out = torch.tanh(out / cap) * cap
        return out.float()

    @torch.no_grad()
    def logits(self, x: dict) -> mx.array:
        return to_mx(self.head_logits(self.arrive(x)["h"]))

    @torch.no_grad()
    def sample(self, x: dict, seqs: list) -> list[int]:
        """Tokens drawn on the device from the last position's logits (a single node's
        decode step computed them already)."""
        if "logits" in x:
            return self.sampler(x["logits"], seqs)
        return self.sampler(self.head_logits(self.arrive(x)["h"][:, -1]), seqs)
