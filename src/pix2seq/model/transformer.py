"""Pre-LN transformer encoder / decoder layers with two attention paths and incremental decoding.

Attention (``impl``):

- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels on GPU);
- ``"math"``: explicit ``matmul + softmax`` (measured faster on CPU, especially the backward);
- ``"auto"``: SDPA for CUDA tensors, math otherwise (decided per call from the tensor's device).

Regularisation is placed as in the official code (its ``TransformerEncoderLayer``, ``MLP``,
``FeedForwardLayer``): drop-path on every residual branch (attention and MLP), dropout inside the
MLP (after the GELU), none on the residual branches themselves or on attention probabilities.
Dropout and drop-path modules are only created when their probability is > 0 (random-mask
generation is costly on CPU). ``eps`` is every LayerNorm's epsilon (PyTorch's 1e-5; official 1e-6).

Incremental decoding (:func:`decoder_step`) runs the whole decoder stack for one position: every
layer writes its self-attention key/value for position ``t`` in place into preallocated buffers
(:class:`StepCache`; no ``torch.cat``) and attends to ``[0, t]``; cross-attention uses keys/values
of the image memory that were either projected once per image (:meth:`StepCache.project_memory`) or
are re-projected from the memory at every step (to emulate implementations that do so). The step
is written with functional ops on weights gathered once per cache (no module calls, no attribute
look-ups per layer and step), and on the math path keeps keys transposed, ``(B, H, Dh, Tmax)``, so
``q @ K^T`` is a plain batched GEMM on contiguous rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_IMPLS = ("auto", "sdpa", "math")


def use_sdpa(impl: str, x: Tensor) -> bool:
    if impl == "sdpa":
        return True
    if impl == "math":
        return False
    if impl == "auto":
        return x.is_cuda
    raise ValueError(f"model.attention: must be one of {ATTENTION_IMPLS}, got {impl!r}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    impl: str = "auto",
    causal: bool = False,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``q (B,H,Tq,Dh)``, ``k, v (B,H,Tk,Dh)`` -> ``(B,H,Tq,Dh)``.

    ``causal`` (``Tq == Tk``): position i attends to ``[0, i]``. The math path can be handed the
    bool ``mask`` (``(Tq, Tk)``, True = blocked, see :func:`causal_mask`) to build it once per stack.
    ``bias``: added to the attention logits, broadcast to ``(B,H,Tq,Tk)`` (not with ``causal``).
    """
    if bias is not None and causal:
        raise ValueError("attention: bias and causal together are not supported")
    if use_sdpa(impl, q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    if bias is not None:
        scores = scores + bias
    if causal:
        if mask is None:
            mask = causal_mask(q.shape[-2], q.device)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


def causal_mask(t: int, device: torch.device) -> Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).triu_(1)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (scaled by 1 / keep)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """``fc2(dropout(gelu(fc1(x))))`` with the exact (erf) GELU, as the official ``tf.nn.gelu``."""

    def __init__(self, d_model: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, d_model)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.fc1(x))
        if self.drop is not None:
            x = self.drop(x)
        return self.fc2(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection."""

    def __init__(self, d_model: int, heads: int, impl: str = "auto") -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"model.heads: d_model {d_model} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = d_model // heads
        self.impl = impl
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, causal: bool = False, mask: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], self.impl, causal, mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class CrossAttention(nn.Module):
    """Multi-head attention from the decoder to the image memory; ``kv`` projects the memory."""

    def __init__(self, d_model: int, heads: int, impl: str = "auto") -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"model.heads: d_model {d_model} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = d_model // heads
        self.impl = impl
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, S, D)`` memory -> keys and values ``(B, H, S, Dh)`` (views of one projection)."""
        b, s, _ = memory.shape
        kv = F.linear(memory, self.kv.weight, self.kv.bias).view(b, s, 2, self.heads, self.head_dim)
        kv = kv.permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(self, x: Tensor, memory: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x (B, T, D)``, ``memory (B, S, D)``; ``bias (B, T, S)`` added to every head's logits."""
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.project_kv(memory)
        out = attention(q, k, v, self.impl, bias=None if bias is None else bias[:, None].to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


def maybe_drop_path(p: float) -> DropPath | None:
    """A :class:`DropPath` module, or None when ``p`` is 0 (no mask is drawn at all)."""
    return DropPath(p) if p > 0 else None


class _Residual(nn.Module):
    """Drop-path bookkeeping of a pre-LN layer's residual branches."""

    drop_path: DropPath | None

    def _branch(self, y: Tensor) -> Tensor:
        return y if self.drop_path is None else self.drop_path(y)


class EncoderLayer(_Residual):
    def __init__(
        self,
        d_model: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        impl: str = "auto",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = SelfAttention(d_model, heads, impl)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, mlp_dim, dropout)
        self.drop_path = maybe_drop_path(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._branch(self.attn(self.norm1(x)))
        return x + self._branch(self.mlp(self.norm2(x)))


class DecoderLayer(_Residual):
    """Causal self-attention + cross-attention to the memory + MLP, all pre-LN."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        impl: str = "auto",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = SelfAttention(d_model, heads, impl)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.cross_attn = CrossAttention(d_model, heads, impl)
        self.norm3 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, mlp_dim, dropout)
        self.drop_path = maybe_drop_path(drop_path)

    def forward(
        self, x: Tensor, memory: Tensor, mask: Tensor | None = None, cross_bias: Tensor | None = None
    ) -> Tensor:
        """Causal over ``x (B, T, D)``; ``mask`` optionally precomputed by :func:`causal_mask`;
        ``cross_bias (B, T, S)``: added to the cross-attention logits."""
        x = x + self._branch(self.self_attn(self.norm1(x), True, mask))
        x = x + self._branch(self.cross_attn(self.norm2(x), memory, cross_bias))
        return x + self._branch(self.mlp(self.norm3(x)))


class Encoder(nn.Module):
    """A stack of pre-LN encoder layers and a final LayerNorm."""

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        impl: str = "auto",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, heads, mlp_dim, dropout, drop_path, impl, eps) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Decoder(nn.Module):
    """A stack of pre-LN decoder layers and a final LayerNorm (embeddings live in the model)."""

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        impl: str = "auto",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, heads, mlp_dim, dropout, drop_path, impl, eps) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.impl = impl

    def forward(self, x: Tensor, memory: Tensor, cross_bias: Tensor | None = None) -> Tensor:
        mask = None if use_sdpa(self.impl, x) else causal_mask(x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, memory, mask, cross_bias)
        return self.norm(x)


# ---------------------------------------------------------------------------- incremental decoding


def _step_weights(layer: DecoderLayer, transposed: bool, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The layer's weights for :func:`decoder_step`; the step's linear weights as ``(in, out)``
    copies in ``dtype`` when ``transposed`` (see :class:`StepCache`)."""
    sa, ca, m = layer.self_attn, layer.cross_attn, layer.mlp

    def lin(w: Tensor) -> Tensor:
        return _transposed(w, dtype) if transposed else w

    def bias(b: Tensor) -> Tensor:
        return b.detach().to(dtype) if transposed else b

    return (
        layer.norm1.weight, layer.norm1.bias, lin(sa.qkv.weight), bias(sa.qkv.bias), lin(sa.proj.weight),
        bias(sa.proj.bias), layer.norm2.weight, layer.norm2.bias, lin(ca.q.weight), bias(ca.q.bias),
        ca.kv.weight, ca.kv.bias, lin(ca.proj.weight), bias(ca.proj.bias),
        layer.norm3.weight, layer.norm3.bias, lin(m.fc1.weight), bias(m.fc1.bias), lin(m.fc2.weight), bias(m.fc2.bias),
    )  # fmt: skip


def _transposed(w: Tensor, dtype: torch.dtype) -> Tensor:
    """``(out, in)`` -> an ``(in, out)`` copy in ``dtype`` (under autocast: cast once, not per step)."""
    return w.detach().t().to(dtype).contiguous()


def _addmm_t(x: Tensor, w_t: Tensor, b: Tensor) -> Tensor:
    """``F.linear`` with an ``(in, out)`` weight."""
    return torch.addmm(b, x, w_t)


class StepCache:
    """Preallocated state of incremental decoding through a :class:`Decoder`'s layers.

    Self-attention: one buffer of keys and one of values for all layers, written in place at
    position ``t``. Values are ``(L, B, H, Tmax, Dh)``; keys are ``(L, B, H, Dh, Tmax)`` on the math
    path (transposed, for a contiguous ``q @ K^T``) and ``(L, B, H, Tmax, Dh)`` on the SDPA path.
    Cross-attention: the memory's keys/values per layer, projected once
    (:meth:`project_memory`, ``cross="full"``), or ``None`` and re-projected from ``memory`` at every
    step (``cross="self"``).

    Two step designs use it:

    - dynamic (:func:`decoder_step`, ``static=False``): position ``cache.pos`` is a Python int and
      attention reads the ``t + 1`` filled positions. The linear weights are gathered once as
      ``(in, out)`` copies: at batch 1 a step is a chain of matrix-vector products whose cost is
      streaming the weights, and MKL streams ``x @ W_t`` 1.2-3x faster than ``x @ W^T`` here (AMD
      EPYC, measured in isolation; 2-4 % of a whole step in fp32). Under autocast the copies (and
      the biases) are made in the autocast dtype, once, instead of casting every weight at every
      step (bf16 step at batch 1: 1.2x).
    - static (:func:`decoder_step_static`, ``static=True``): the position is a device tensor, every
      shape is fixed (attention reads all ``max_len`` positions, the unwritten ones masked), so the
      step can be captured as one CUDA graph or compiled once and replayed. Buffers start zeroed
      (a masked position must hold a finite value) and the step reads the module's own weights, so
      a step captured once sees later weight updates. :meth:`reset` reuses the cache for the next
      images of the same shape.

    ``StepCache.transpose_weights = False`` makes the dynamic step read the module's weights as it
    did before the copies (bench/decode.py measures the two side by side).
    """

    transpose_weights = True

    def __init__(
        self,
        decoder: Decoder,
        memory: Tensor,
        max_len: int,
        dtype: torch.dtype,
        project: bool,
        repeat: int = 1,
        head: tuple[Tensor, Tensor] | None = None,
        static: bool = False,
    ) -> None:
        """``head``: the output projection ``(weight (V, D), bias (V,))`` applied by :meth:`logits`."""
        layers = decoder.layers
        first = layers[0].self_attn
        self.heads, self.head_dim = first.heads, first.head_dim
        self.d_model = self.heads * self.head_dim
        self.eps = decoder.norm.eps
        self.sdpa = use_sdpa(decoder.impl, memory)
        self.max_len = max_len
        self.num_layers = len(layers)
        self.project = project
        self.repeat = repeat
        self.static = static
        self.pos = 0
        transposed = self.transpose_weights and not static
        self.linear = _addmm_t if transposed else F.linear
        self.weights = [_step_weights(layer, transposed, dtype) for layer in layers]
        self.norm = (decoder.norm.weight, decoder.norm.bias)
        self.head = None
        if head is not None:
            self.head = (_transposed(head[0], dtype), head[1].detach().to(dtype)) if transposed else head

        b, h, dh, dev = memory.shape[0] * repeat, self.heads, self.head_dim, memory.device
        self.batch_size = b
        self.memory_len = memory.shape[1]
        new = torch.zeros if static else torch.empty  # a masked position must hold a finite value
        k_shape = (len(layers), b, h, max_len, dh) if self.sdpa else (len(layers), b, h, dh, max_len)
        self.k = new(k_shape, dtype=dtype, device=dev)
        self.v = new((len(layers), b, h, max_len, dh), dtype=dtype, device=dev)
        self.k_write = [self.k[i] for i in range(len(layers))]  # SDPA (B,H,Tmax,Dh), math (B,H,Dh,Tmax)
        self.v_write = [self.v[i] for i in range(len(layers))]  # (B, H, Tmax, Dh)
        if self.sdpa:
            self.k_read, self.v_read = self.k_write, self.v_write
        else:
            self.k_read = [k.view(b * h, dh, max_len) for k in self.k_write]
            self.v_read = [v.view(b * h, max_len, dh) for v in self.v_write]
        self.tokens = torch.zeros((b, max_len), dtype=torch.long, device=dev)  # the inputs so far
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)
        self.memory = memory.repeat_interleave(repeat, 0) if repeat > 1 else memory
        if project:
            self.cross = [self.project_memory(memory, w[10], w[11], repeat) for w in self.weights]
        elif static:  # re-projected inside the step: the memory must live in a fixed buffer
            self.memory = self.memory.clone()

    def reset(self, memory: Tensor) -> None:
        """Start decoding the next images (same shapes) in this cache: a static cache is reused."""
        if memory.shape[0] * self.repeat != self.batch_size or memory.shape[1] != self.memory_len:
            raise ValueError(f"memory {tuple(memory.shape)} does not fit this cache")
        self.pos = 0
        if self.project:
            for w, (k, v) in zip(self.weights, self.cross, strict=True):
                new_k, new_v = self.project_memory(memory, w[10], w[11], self.repeat)
                k.copy_(new_k)
                v.copy_(new_v)
        else:
            self.memory.copy_(memory.repeat_interleave(self.repeat, 0) if self.repeat > 1 else memory)

    def project_memory(
        self, memory: Tensor, w: Tensor, bias: Tensor, repeat: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Memory ``(B, S, D)`` -> this path's cross-attention keys and values.

        Math path: keys ``(B*H, Dh, S)``, values ``(B*H, S, Dh)``; SDPA: both ``(B, H, S, Dh)``.
        """
        b, s, _ = memory.shape
        h, dh, d = self.heads, self.head_dim, self.d_model
        kv = F.linear(memory, w, bias)
        k = kv[..., :d].view(b, s, h, dh)
        v = kv[..., d:].view(b, s, h, dh)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
            b *= repeat
        if self.sdpa:
            return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        return k.permute(0, 2, 3, 1).reshape(b * h, dh, s), v.transpose(1, 2).reshape(b * h, s, dh)

    def logits(self, h: Tensor) -> Tensor:
        """Decoder output ``(B, D)`` -> vocabulary logits ``(B, V)`` through ``head``."""
        return self.linear(h, *self.head)

    def reorder(self, index: Tensor) -> None:
        """Row ``r`` takes the self-attention history of row ``index[r]`` (beam search).

        Only the self-attention cache moves: rows keep their image memory (beams of one image), so
        the memory and its projected keys/values stay where they are.
        """
        n = self.pos
        if n == 0:
            return
        for buf, dim in ((self.k, 3 if self.sdpa else 4), (self.v, 3)):
            hist = buf.narrow(dim, 0, n)
            hist.copy_(hist.index_select(1, index))
        hist = self.tokens.narrow(1, 0, n)
        hist.copy_(hist.index_select(0, index))


def decoder_step(x: Tensor, cache: StepCache, cross_bias: Tensor | None = None) -> Tensor:
    """The decoder stack for one position: ``x (B, D)`` embedded input at ``cache.pos`` -> ``(B, D)``
    after the final LayerNorm. Inference only (no dropout); advances ``cache.pos``.
    ``cross_bias (B, S)``: added to every head's cross-attention logits."""
    t = cache.pos
    if t >= cache.max_len:
        raise ValueError(f"the cache holds {cache.max_len} positions; position {t} is past its end")
    out = _step(x, cache, t, None, cross_bias)
    cache.pos = t + 1
    return out


def decoder_step_static(x: Tensor, pos: Tensor, cache: StepCache, cross_bias: Tensor | None = None) -> Tensor:
    """:func:`decoder_step` with static shapes: ``pos`` is a ``(1,)`` long tensor on the cache's
    device, attention spans all ``cache.max_len`` positions with those after ``pos`` masked, and
    ``cache.pos`` is left alone (the caller tracks it), so the whole step can be captured once."""
    if not cache.static:
        raise ValueError("decoder_step_static needs a StepCache built with static=True")
    return _step(x, cache, None, pos, cross_bias)


def _step(
    x: Tensor, cache: StepCache, t: int | None, pos: Tensor | None, cross_bias: Tensor | None
) -> Tensor:
    """One position through every layer: dynamic (``t``) or static (``pos``); see :class:`StepCache`."""
    b, d = x.shape
    h, dh, eps = cache.heads, cache.head_dim, cache.eps
    bh, shape, scale = b * h, (d,), dh**-0.5
    sdpa, memory, linear = cache.sdpa, cache.memory, cache.linear
    n = cache.max_len if pos is not None else t + 1
    # static: positions after `pos` are masked (SDPA: True = attend; math: True = blocked)
    mask = None
    if pos is not None:
        ahead = torch.arange(cache.max_len, device=x.device) > pos
        mask = (~ahead).view(1, -1) if sdpa else ahead.view(1, 1, -1)
    k_dim = 2 if sdpa else 3
    # (B, 1, 1, S) in the cache's (= the projections') dtype, cast once for all layers
    bias = None if cross_bias is None else cross_bias[:, None, None, :].to(cache.k.dtype)
    layers = zip(
        cache.weights, cache.k_write, cache.v_write, cache.k_read, cache.v_read, cache.cross, strict=True
    )
    for w, k_w, v_w, k_r, v_r, cross in layers:
        (n1w, n1b, qkv_w, qkv_b, so_w, so_b, n2w, n2b, cq_w, cq_b, ckv_w, ckv_b, co_w, co_b,
         n3w, n3b, f1w, f1b, f2w, f2b) = w  # fmt: skip
        # causal self-attention over positions [0, t]
        y = F.layer_norm(x, shape, n1w, n1b, eps)
        q, k, v = linear(y, qkv_w, qkv_b).split(d, 1)
        if pos is None:
            v_w.select(2, t).copy_(v.view(b, h, dh))
            k_w.select(k_dim, t).copy_(k.view(b, h, dh))
        else:
            v_w.index_copy_(2, pos, v.view(b, h, 1, dh))
            k_w.index_copy_(k_dim, pos, k.view(b, h, 1, dh) if sdpa else k.view(b, h, dh, 1))
        if sdpa:
            o = F.scaled_dot_product_attention(
                q.view(b, h, 1, dh), k_r.narrow(2, 0, n), v_r.narrow(2, 0, n), attn_mask=mask
            )
        else:
            s = torch.bmm((q * scale).view(bh, 1, dh), k_r.narrow(2, 0, n))
            if mask is not None:
                s = s.masked_fill(mask, float("-inf"))
            o = torch.bmm(s.softmax(-1), v_r.narrow(1, 0, n))
        x = x + linear(o.reshape(b, d), so_w, so_b)
        # cross-attention to the image memory
        y = F.layer_norm(x, shape, n2w, n2b, eps)
        ck, cv = cross if cross is not None else cache.project_memory(memory, ckv_w, ckv_b)
        q = linear(y, cq_w, cq_b)
        if sdpa:
            o = F.scaled_dot_product_attention(q.view(b, h, 1, dh), ck, cv, attn_mask=bias)
        else:
            s = torch.bmm((q * scale).view(bh, 1, dh), ck)
            if bias is not None:
                s = (s.view(b, h, 1, -1) + bias).view(bh, 1, -1)
            o = torch.bmm(s.softmax(-1), cv)
        x = x + linear(o.reshape(b, d), co_w, co_b)
        # MLP
        y = F.layer_norm(x, shape, n3w, n3b, eps)
        x = x + linear(F.gelu(linear(y, f1w, f1b)), f2w, f2b)
    return F.layer_norm(x, shape, cache.norm[0], cache.norm[1], eps)


OFFICIAL_TWO_PI = 6.2831852  # the official code's normalisation_max (2 pi to 8 digits)


def sincos_code(pos: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """``(n,)`` positions -> ``(n, dim)`` codes ``[sin(p w_k), cos(p w_k)]``, ``w_k = T^(-k / (dim/2))``,
    ``k < dim/2``: sines then cosines, not interleaved (the official ``positional_encoding``)."""
    half = dim // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float32, device=pos.device) / half)
    angle = pos[:, None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def grid_coords(n: int, normalize: bool, device: torch.device | None = None) -> Tensor:
    """``(n,)`` coordinates of ``n`` feature cells: ``0..n-1``, or ``i / (n - 1) * 2 pi`` (normalised).

    A single cell gets 0 (the official code divides by ``n - 1 = 0`` there and gets NaN).
    """
    c = torch.arange(n, dtype=torch.float32, device=device)
    return c / max(n - 1, 1) * OFFICIAL_TWO_PI if normalize else c


def sincos_2d(
    h: int,
    w: int,
    dim: int,
    device: torch.device | None = None,
    temperature: float = 10000.0,
    normalize: bool = False,
) -> Tensor:
    """2-D sine-cosine positions ``(h * w, dim)`` in row-major order: [sin y, cos y, sin x, cos x].

    ``normalize`` (the official ``add_vis_pos_emb`` with ``sin_cos``): coordinates ``i / (n-1) * 2 pi``
    instead of cell indices, and a grid of one row or one column gets the 1-D code of the flat index
    over all ``dim`` channels.
    """
    if dim % 4:
        raise ValueError(f"model.d_model: 2-D sine-cosine positions need a multiple of 4, got {dim}")
    if normalize and (h == 1 or w == 1):
        return sincos_code(grid_coords(h * w, True, device), dim, temperature)
    y = sincos_code(grid_coords(h, normalize, device), dim // 2, temperature)  # (h, dim/2)
    x = sincos_code(grid_coords(w, normalize, device), dim // 2, temperature)  # (w, dim/2)
    return torch.cat([y[:, None].expand(h, w, -1), x[None].expand(h, w, -1)], dim=-1).reshape(h * w, dim)


def sincos_1d(n: int, dim: int) -> Tensor:
    """``(n, dim)`` sine-cosine codes of the positions ``0..n-1``, unit variance per column pair.

    Used for the coordinate-token embeddings (``model.coord_init: sincos``): bins that are close in
    value get close codes, so the shared embedding starts with the order of the coordinates built
    in, rather than learning from data that bin 41 sits next to bin 42. Periods run geometrically
    from 4 bins to 4n bins: every frequency varies over the range, none is a constant offset.
    """
    half = dim // 2
    period = 4.0 * float(n) ** (torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    phase = torch.arange(n, dtype=torch.float64)[:, None] * (2 * torch.pi / period)[None, :]
    code = torch.cat([phase.sin(), phase.cos()], dim=1) * 2.0**0.5  # sin/cos over a cycle: variance 1/2
    if code.shape[1] < dim:
        code = torch.cat([code, torch.zeros(n, dim - code.shape[1], dtype=code.dtype)], dim=1)
    return code.float()


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Trunc-normal(0.02) linear / embedding weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


__all__ = [
    "ATTENTION_IMPLS",
    "StepCache",
    "decoder_step",
    "decoder_step_static",
    "Decoder",
    "DecoderLayer",
    "DropPath",
    "Encoder",
    "EncoderLayer",
    "attention",
    "causal_mask",
    "init_weights",
    "maybe_drop_path",
    "sincos_1d",
    "sincos_2d",
    "use_sdpa",
]
