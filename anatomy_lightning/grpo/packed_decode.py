"""Decoding on packed weights: the fast path's per-token forwards on a CPU, in float32.

A decode step sends B rows (16 in the benchmark) through every weight of the language model. On a
CPU two things dominate it (`benchmarks/profile_step.py`): MKL's GEMM on row-major weights at so few
rows (about 45 GFLOP/s on one thread here, where oneDNN's blocked layout reaches about 70), and the
module machinery around it (848 operators per token on the ~30M benchmark model with LoRA, four of
them for each adapted linear). So, once per rollout, `PackedDecoder` copies the language model's
linear weights into oneDNN's blocked layout, with LoRA merged in (W + peft's delta weight), q/k/v
fused into one matrix and gate/up into another, and runs each token as about 20 operators per layer
on (rows, hidden) tensors, with the KV cache in buffers grown in place. Prefill stays the model's own
forward (it places the image features).

What changes is float rounding only: oneDNN sums in another order and the merge rounds W + s·BA once,
so logits agree with the module forward to about 1e-5 relative. The first decode step of a model is
checked against its module forward; a larger gap switches packed decoding off for that model with a
warning. Log-probs, loss and gradients still come from the module forward: only the sampling
distribution moves, by rounding.

`model.packed_decode`: null (auto) uses it for a float32 model on the CPU whose language-model
weights fit in `AUTO_MAX_BYTES` (the copy is remade every rollout); true asks for it wherever it is
supported; false never. Supported: the Qwen2-VL, Qwen2.5-VL and Qwen3-VL text decoders with plain or
vanilla-LoRA linears, unsharded.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

AUTO_MAX_BYTES = 1 << 30  # auto mode: at most 1 GiB of language-model weights to copy per rollout
_checked: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()  # model -> first check passed


def _packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _linear_problem(mod: nn.Module) -> str | None:
    """None when `mod` is a plain float32 CPU linear or a vanilla LoRA layer on one, else why not."""
    base = getattr(mod, "base_layer", mod)
    if type(base) is not nn.Linear:
        return f"{type(base).__name__} layers (quantised or custom)"
    if type(base.weight.data) is not Tensor or base.weight.dtype != torch.float32 or base.weight.device.type != "cpu":
        return "weights that are not plain float32 CPU tensors (sharded, half precision or on an accelerator)"
    if base is mod:
        return None
    for name in mod.active_adapters:
        if name in (getattr(mod, "lora_variant", None) or {}):
            return f"a LoRA variant on adapter {name!r} (DoRA or similar)"
        if name in mod.lora_B and getattr(mod.lora_B[name], "bias", None) is not None:
            return f"lora_bias on adapter {name!r}"
    return None


def _effective_weight(mod: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) a plain or vanilla-LoRA linear computes with: W plus peft's delta of each active adapter."""
    base = getattr(mod, "base_layer", mod)
    weight, bias = base.weight.detach(), None if base.bias is None else base.bias.detach()
    if base is mod or getattr(mod, "disable_adapters", False) or getattr(mod, "merged", False):
        return weight, bias
    for name in mod.active_adapters:
        if name in mod.lora_A:
            weight = weight + mod.get_delta_weight(name).to(weight.dtype)
    return weight, bias


def unsupported_reason(model: Any) -> str | None:
    """None when `PackedDecoder` can decode for `model`, else why not (a phrase for the log)."""
    from anatomy_lightning.grpo.fast_path import vl_backbone

    if not _packing_available():
        return "this torch build has no oneDNN weight packing"
    bb = vl_backbone(model)
    lm = getattr(bb, "language_model", None)
    layers = getattr(lm, "layers", None)
    if layers is None:
        return "not a Qwen-VL text decoder"
    cfg = lm.config
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])):
        return "sliding-window or linear-attention layers"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return f"decoder layer {type(layer).__name__} is not laid out as Qwen's"
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return f"MLP {type(mlp).__name__} is not a gated MLP"
        for mod in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            why = _linear_problem(mod)
            if why is not None:
                return why
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _linear_problem(base.get_output_embeddings())


def use_packed_decode(model: Any, setting: bool | None) -> bool:
    """Whether this rollout decodes on packed weights (`model.packed_decode`: None = auto)."""
    if setting is False or _checked.get(model) is False:
        return False
    why = unsupported_reason(model)
    if why is not None:
        if setting:
            log.warning("model.packed_decode=true but %s: decoding with the model's forward", why)
            _checked[model] = False
        return False
    if setting is None:
        from anatomy_lightning.grpo.fast_path import vl_backbone

        lm = vl_backbone(model).language_model
        size = sum(p.numel() * p.element_size() for p in lm.layers.parameters())
        return size <= AUTO_MAX_BYTES
    return True


def _rms(weight: Tensor, eps: float) -> Callable[[Tensor], Tensor]:
    shape = (weight.shape[-1],)
    w = weight.detach()
    return lambda x: F.rms_norm(x, shape, w, eps)


class _Packed:
    """One linear (or several fused along the output) in oneDNN's blocked layout."""

    def __init__(self, parts: list[tuple[Tensor, Tensor | None]], rows: int) -> None:
        weight = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
        biases = [b for _, b in parts]
        if all(b is None for b in biases):
            self.bias = None
        else:
            self.bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for (w, _), b in zip(parts, biases)])
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _weights(*mods: nn.Module) -> list[tuple[Tensor, Tensor | None]]:
    return [_effective_weight(mod) for mod in mods]


class _Layer:
    def __init__(self, layer: nn.Module, rows: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _Packed(_weights(attn.q_proj, attn.k_proj, attn.v_proj), rows)
        self.o = _Packed(_weights(attn.o_proj), rows)
        self.gate_up = _Packed(_weights(mlp.gate_proj, mlp.up_proj), rows)
        self.down = _Packed(_weights(mlp.down_proj), rows)
        self.act = mlp.act_fn
        self.inter = getattr(mlp.gate_proj, "base_layer", mlp.gate_proj).weight.shape[0]
        self.norm1 = _rms(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm2 = _rms(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # Qwen3-VL: per-head RMSNorm
        self.q_norm = _rms(qn.weight, qn.variance_epsilon) if qn is not None else None
        self.k_norm = _rms(kn.weight, kn.variance_epsilon) if kn is not None else None
        self.scaling = attn.scaling
        self.head_dim = attn.head_dim
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads


class PackedDecoder:
    """The language model's decode step on a per-rollout packed copy of its weights.

    Built after prefill from the prefill's KV cache (already repeated G times); `capacity` is how
    many more tokens the buffers must hold. `step` takes the new tokens, their (3, b, 1) positions
    and the (b, L) attention mask including them, and returns (b, V) float logits.
    """

    def __init__(self, model: Any, cache: Any, capacity: int) -> None:
        from anatomy_lightning.grpo.fast_path import vl_backbone

        lm = vl_backbone(model).language_model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        rows = keys[0].shape[0]
        with torch.no_grad():
            self.layers = [_Layer(layer, rows) for layer in lm.layers]
            self.head = _Packed(_weights(base.get_output_embeddings()), rows)
        self.embed, self.rotary = lm.embed_tokens, lm.rotary_emb
        self.norm = _rms(lm.norm.weight, lm.norm.variance_epsilon)
        self.length = keys[0].shape[2]
        self.k, self.v = [], []
        for k, v in zip(keys, values):
            kb = k.new_empty((*k.shape[:2], self.length + capacity, k.shape[3]))
            vb = v.new_empty((*v.shape[:2], self.length + capacity, v.shape[3]))
            kb[:, :, : self.length] = k
            vb[:, :, : self.length] = v
            self.k.append(kb)
            self.v.append(vb)

    def select(self, keep: Tensor) -> None:
        """Keep only rows `keep` (rows that stopped writing leave the batch)."""
        self.k = [kb[keep] for kb in self.k]
        self.v = [vb[keep] for vb in self.v]

    @torch.no_grad()
    def step(self, tok: Tensor, positions: Tensor, attention: Tensor) -> Tensor:
        b = tok.shape[0]
        if attention.shape[1] != self.length + 1:
            raise ValueError(f"attention covers {attention.shape[1]} positions, the cache holds {self.length} + 1")
        h = self.embed(tok)  # (b, hidden)
        cos, sin = self.rotary(h[:, None], positions)  # (b, 1, D)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)  # broadcast over (b, heads, D)
        mask = attention.bool()[:, None, None, :]  # (b, 1, 1, L): sdpa's True = attend
        pos = self.length
        for i, ly in enumerate(self.layers):
            D, H, KV = ly.head_dim, ly.heads, ly.kv_heads
            qkv = ly.qkv(ly.norm1(h)).view(b, H + 2 * KV, D)
            q, k, v = qkv[:, :H], qkv[:, H : H + KV], qkv[:, H + KV :]
            if ly.q_norm is not None:
                q, k = ly.q_norm(q), ly.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i][:, :, pos] = k
            self.v[i][:, :, pos] = v
            a = F.scaled_dot_product_attention(
                q.reshape(b, KV, H // KV, D),  # query heads grouped by their KV head, as repeat_kv pairs them
                self.k[i][:, :, : pos + 1],
                self.v[i][:, :, : pos + 1],
                attn_mask=mask,
                scale=ly.scaling,
            )  # (b, KV, H / KV, D)
            h = h + ly.o(a.reshape(b, H * D))
            gu = ly.gate_up(ly.norm2(h))
            h = h + ly.down(ly.act(gu[:, : ly.inter]) * gu[:, ly.inter :])
        self.length += 1
        return self.head(self.norm(h)).float()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModuleDecoder:
    """The model's own forward, one token at a time on its KV cache (every model, every device)."""

    def __init__(self, model: Any, cache: Any) -> None:
        self.model, self.cache = model, cache

    def select(self, keep: Tensor) -> None:
        self.cache.batch_select_indices(keep)

    def step(self, tok: Tensor, positions: Tensor, attention: Tensor) -> Tensor:
        out = self.model(
            input_ids=tok[:, None], attention_mask=attention, position_ids=positions, cache=self.cache,
            use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1].float()


class FirstStepCheck:
    """A model's first packed decode step, run beside its module forward: the packed decoder is kept
    from then on if their logits agree, else the module forward carries on (its cache is in step)."""

    def __init__(self, model: Any, module: ModuleDecoder, packed: PackedDecoder) -> None:
        self.model, self.module, self.packed = model, module, packed
        self.current: ModuleDecoder | PackedDecoder | None = None

    def select(self, keep: Tensor) -> None:
        if self.current is not None:
            return self.current.select(keep)
        self.module.select(keep)
        self.packed.select(keep)

    def step(self, tok: Tensor, positions: Tensor, attention: Tensor) -> Tensor:
        if self.current is not None:
            return self.current.step(tok, positions, attention)
        packed = self.packed.step(tok, positions, attention)
        reference = self.module.step(tok, positions, attention)
        self.current = self.packed if agrees(self.model, packed, reference) else self.module
        return packed if self.current is self.packed else reference


def make_decoder(model: Any, cache: Any, capacity: int, setting: bool | None) -> Any:
    """The decoder for one rollout after prefill: packed when `setting` and the model allow (checked
    against the module forward on the model's first use), else the module forward."""
    if not use_packed_decode(model, setting):
        return ModuleDecoder(model, cache)
    packed = PackedDecoder(model, cache, capacity)
    if model in _checked:
        return packed
    return FirstStepCheck(model, ModuleDecoder(model, cache), packed)


def agrees(model: Any, packed: Tensor, reference: Tensor) -> bool:
    """Compare a packed decode step with the module forward's logits; remember the verdict for `model`."""
    gap = float((packed - reference).abs().max())
    tol = 1e-3 * (1.0 + float(reference.abs().max()))
    ok = gap <= tol
    _checked[model] = ok
    if ok:
        log.info("packed decode: first step within %.2e of the model's forward (tolerance %.2e)", gap, tol)
    else:
        log.warning("packed decode switched off: its logits differ from the model's forward by %.3g "
                    "(tolerance %.3g); decoding with the model's forward", gap, tol)
    return ok
