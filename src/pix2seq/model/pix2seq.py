"""The Pix2Seq model (spec section 6): image -> memory -> autoregressive token logits.

::

    images (uint8 or [0,1] float) -> ImageNet mean/std (model.pixels: imagenet) -> ResNet (C4 or C5)
      -> dropout -> linear to d_model -> LayerNorm -> + 2-D sine-cosine positions -> pre-LN encoder
      -> LayerNorm -> bridge: linear + LayerNorm, + visual positions, + residual MLP = memory (B, S, D)
    tokens -> shared token embedding + learned 1-D positions -> pre-LN decoder (causal self-attn,
      cross-attn to memory, MLP) -> LayerNorm -> logits = h @ E^T + output bias      (B, T, V)
    model.box_attention (not in the paper): cross-attention logits at class positions
      + a Gaussian log-prior around the box named by the 4 coordinate tokens before them

Incremental decoding (used by :mod:`pix2seq.decoding`)::

    cache = model.init_cache(memory, max_len, cross="full" | "self", repeat=1, static=False)
    logits = model.decode_step(tokens, cache)      # tokens (B,) at position cache.pos -> (B, V)
    cache.reorder(index)                            # beam search: rows follow their parent beams
    logits = model.decode_step_static(tokens, pos, cache, cross_bias)   # static shapes (static=True)

(the cache is a :class:`pix2seq.model.transformer.StepCache`; see there for its layout).

The same module computes google-research/pix2seq's ``encoder_ar_decoder`` exactly (its
``ResNetTransformer`` + ``proj``/``proj_ln``/``proj_mlp`` + ``AutoregressiveDecoder``) with the official
switches of :class:`~pix2seq.config.ModelConfig`: ``pixels: official`` (raw [0, 1] input),
``stem_pool: same``, ``ln_eps: 1e-6``, ``pos_normalize: true`` and ``max_seq_len: 512``;
:mod:`pix2seq.weights.convert` maps a checkpoint's tensors onto it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pix2seq.config import ModelConfig
from pix2seq.model.backbone import Backbone
from pix2seq.model.transformer import (
    MLP,
    Decoder,
    Encoder,
    StepCache,
    decoder_step,
    decoder_step_static,
    init_weights,
    maybe_drop_path,
    sincos_1d,
    sincos_2d,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Pix2Seq(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        max_seq_len: int,
        coord_tokens: tuple[int, int] | None = None,
    ) -> None:
        """``coord_tokens``: the ``[start, end)`` ids of the coordinate tokens (``cfg.coord_init``)."""
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.coord_tokens = coord_tokens
        if cfg.coord_init != "random" and coord_tokens is None:
            raise ValueError(f"model.coord_init={cfg.coord_init!r} needs the coordinate token range")
        if cfg.box_attention and coord_tokens is None:
            raise ValueError("model.box_attention needs the coordinate token range")
        self.max_seq_len = max_seq_len
        self.d_model = d
        self.heads = cfg.heads

        eps = cfg.ln_eps
        self.backbone = Backbone(
            cfg.backbone, cfg.backbone_stage, cfg.pretrained, cfg.backbone_norm, cfg.stem_pool
        )
        # one dropout on the backbone's features (the official ResNetTransformer's)
        self.feature_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.input_proj = nn.Linear(self.backbone.num_channels, d)
        self.input_norm = nn.LayerNorm(d, eps=eps)
        self.encoder = Encoder(
            cfg.encoder_layers, d, cfg.heads, cfg.mlp_dim, cfg.dropout, cfg.drop_path, cfg.attention, eps
        )
        # bridge from the encoder to the decoder's memory (official: proj, proj_ln, proj_mlp)
        self.bridge_proj = nn.Linear(d, d)
        self.bridge_norm = nn.LayerNorm(d, eps=eps)
        self.bridge_mlp_norm = nn.LayerNorm(d, eps=eps)
        self.bridge_mlp = MLP(d, cfg.mlp_dim, cfg.dropout)
        self.bridge_drop_path = maybe_drop_path(cfg.drop_path)

        self.token_embed = nn.Embedding(vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(max_seq_len, d))
        self.decoder = Decoder(
            cfg.decoder_layers, d, cfg.heads, cfg.mlp_dim, cfg.dropout, cfg.drop_path, cfg.attention, eps
        )
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))

        # [0, 1] pixels -> the backbone's input: x * scale + shift (ImageNet mean/std, or identity)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.pixels == "imagenet" else ((0.0,) * 3, (1.0,) * 3)
        mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / std, persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Trunc-normal(0.02) for linear layers, embeddings and positions; zero biases (not the backbone)."""
        for name, child in self.named_children():
            if name != "backbone":
                child.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.out_bias)
        if self.cfg.coord_init == "sincos":
            start, end = self.coord_tokens
            with torch.no_grad():
                self.token_embed.weight[start:end] = 0.02 * sincos_1d(end - start, self.d_model)

    # ------------------------------------------------------------------------------- encoder
    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``[0, 255]`` or float ``[0, 1]`` images -> the backbone's input: ImageNet-normalised
        (``model.pixels: imagenet``) or the raw ``[0, 1]`` values (``official``)."""
        dtype = self.pixel_scale.dtype
        if images.dtype == torch.uint8:
            x = images.to(dtype) * (1.0 / 255.0)
        else:
            x = images.to(dtype)
        return x * self.pixel_scale + self.pixel_shift

    def encode(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images -> the decoder's memory ``(B, S, D)``, S = (H/stride)(W/stride)."""
        f = self.backbone(self.normalize(images))
        b, _, h, w = f.shape
        f = f.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major cells
        if self.feature_drop is not None:
            f = self.feature_drop(f)
        x = self.input_norm(self.input_proj(f))
        pos = sincos_2d(h, w, self.d_model, x.device, self.cfg.pos_temperature, self.cfg.pos_normalize).to(
            x.dtype
        )
        x = self.encoder(x + pos)
        x = self.bridge_norm(self.bridge_proj(x))
        x = x + pos.to(x.dtype)
        y = self.bridge_mlp(self.bridge_mlp_norm(x))
        return x + (y if self.bridge_drop_path is None else self.bridge_drop_path(y))

    # ------------------------------------------------------------------------------- decoder
    def logits(self, h: Tensor) -> Tensor:
        """Decoder output (after its LayerNorm) -> vocabulary logits with the shared embedding."""
        return F.linear(h, self.token_embed.weight, self.out_bias)

    def decode(self, tokens: Tensor, memory: Tensor, last_only: bool = False) -> Tensor:
        """Teacher-forced / full-prefix decoding: ``tokens (B, T)`` -> logits ``(B, T, V)``.

        ``last_only``: logits of the last position only, ``(B, V)`` (re-running the prefix).
        """
        t = tokens.shape[1]
        if t > self.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.max_seq_len}")
        x = self.token_embed(tokens) + self.pos_embed[:t]
        bias = None
        if self.cfg.box_attention and t > 4:
            at = torch.arange(4, t, 5, device=tokens.device)  # inputs = xmax: the next target is a class
            boxes = tokens[:, at[:, None] + torch.arange(-3, 1, device=tokens.device)]  # (B, K, 4)
            # built once in the projections' dtype, so no layer has to cast it
            dtype = _projection_dtype(memory, self.token_embed.weight)
            bias = memory.new_zeros(tokens.shape[0], t, memory.shape[1], dtype=dtype)
            bias[:, at] = self.box_attention_bias(boxes, memory.shape[1]).to(dtype)
        h = self.decoder(x, memory, bias)
        if last_only:
            h = h[:, -1]
        return self.logits(h)

    def forward(self, images: Tensor, input_tokens: Tensor) -> Tensor:
        """``images (B,3,H,W)``, ``input_tokens (B,T)`` -> logits ``(B,T,V)``."""
        return self.decode(input_tokens, self.encode(images))

    # ------------------------------------------------------------------- incremental decoding
    def init_cache(
        self, memory: Tensor, max_len: int, cross: str = "full", repeat: int = 1, static: bool = False
    ) -> StepCache:
        """A fresh decoding cache for up to ``max_len`` positions of every memory row.

        ``cross="full"`` projects the memory's cross-attention keys/values here, once; ``"self"``
        leaves them to be re-projected every step. ``repeat``: every image's rows are repeated
        this many times (beam search), after the projection. Buffers take the dtype the
        projections produce (the autocast dtype when called under autocast). ``static``: for
        :meth:`decode_step_static` (see :class:`StepCache`).
        """
        if cross not in ("full", "self"):
            raise ValueError(f"cross must be 'full' or 'self', got {cross!r}")
        if max_len > self.max_seq_len:
            raise ValueError(f"{max_len} positions exceed max_seq_len {self.max_seq_len}")
        dtype = _projection_dtype(memory, self.token_embed.weight)
        head = (self.token_embed.weight, self.out_bias)
        return StepCache(
            self.decoder,
            memory,
            max_len,
            dtype,
            project=cross == "full",
            repeat=repeat,
            head=head,
            static=static,
        )

    def decode_step(self, tokens: Tensor, cache: StepCache) -> Tensor:
        """``tokens (B,)`` at position ``cache.pos`` -> next-token logits ``(B, V)``; advances the cache."""
        t = cache.pos
        x = F.embedding(tokens, self.token_embed.weight) + self.pos_embed[t]
        bias = self.record_step_token(tokens, cache, t)
        return cache.logits(decoder_step(x, cache, bias))

    def record_step_token(self, tokens: Tensor, cache: StepCache, t: int) -> Tensor | None:
        """Keep ``tokens (B,)`` at position ``t`` of ``cache``; at a class position with box attention,
        the cross-attention bias ``(B, S)`` of the box just named, else None."""
        if t < cache.max_len:
            cache.tokens[:, t] = tokens
        if self.cfg.box_attention and t % 5 == 4:
            return self.box_attention_bias(cache.tokens[:, t - 3 : t + 1], cache.memory_len)
        return None

    def decode_step_static(
        self, tokens: Tensor, pos: Tensor, cache: StepCache, cross_bias: Tensor | None = None
    ) -> Tensor:
        """:meth:`decode_step` with static shapes, for a captured or compiled step: ``pos`` is a
        ``(1,)`` long tensor, ``cross_bias (B, S)`` the box-attention bias (zeros where none; the
        caller computes it and keeps ``cache.tokens`` and ``cache.pos``)."""
        x = F.embedding(tokens, self.token_embed.weight) + self.pos_embed.index_select(0, pos)
        return cache.logits(decoder_step_static(x, pos, cache, cross_bias))

    def box_attention_bias(self, boxes: Tensor, memory_len: int) -> Tensor:
        """``(..., 4)`` coordinate tokens ``ymin, xmin, ymax, xmax`` -> ``(..., S)`` cross-attention
        logit bias over a square grid of ``S`` feature cells: ``-d^2 / 2``, ``d`` the distance of a
        cell's centre from the box centre in half box sizes (at least half a cell)."""
        side = math.isqrt(memory_len)
        if side * side != memory_len:
            raise ValueError(f"model.box_attention needs a square feature grid, got {memory_len} cells")
        start, end = self.coord_tokens
        v = (boxes - start).clamp(0, end - start - 1).float() / (end - start - 1)  # [0, 1] of the canvas
        centre = (torch.arange(side, device=v.device, dtype=v.dtype) + 0.5) / side  # (side,)
        half_cell = 0.5 / side

        def scaled(lo: Tensor, hi: Tensor) -> Tensor:  # (..., side)
            mid, half = (lo + hi) / 2, ((hi - lo).abs() / 2).clamp_min(half_cell)
            return (centre - mid[..., None]) / half[..., None]

        dy, dx = scaled(v[..., 0], v[..., 2]), scaled(v[..., 1], v[..., 3])
        return -0.5 * (dy[..., :, None] ** 2 + dx[..., None, :] ** 2).flatten(-2)


def _projection_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, weight)`` produces here (the autocast dtype when autocast is on)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, weight.dtype)
