"""Autoregressive generation: greedy, nucleus and beam search, with a KV cache and constraints.

::

    out = generate(model, images, vocab, num_objects, method="greedy"|"nucleus"|"beam",
                   top_p=0.4, temperature=1.0, beam_size=4, constrained=True,
                   cache="full"|"self"|"none", generator=None, autocast_dtype=None,
                   coord_window=0.0, step="auto"|"eager"|"graph"|"compile", step_autocast=True)
    out.tokens       # (B, 5 * num_objects) long, the prompt excluded
    out.class_probs  # (B, num_objects, C) float32: P(class) at every class position
    out.coords       # (B, num_objects, 4) float32: ymin, xmin, ymax, xmax in bins (0 .. bins - 1)
    out.compile_s    # seconds this call spent capturing / compiling the step (0.0: reused or eager)

Generated position ``i`` (0-based, after the prompt) is a class position when ``i % 5 == 4``, a
coordinate position otherwise. ``constrained=True`` masks the logits to
``vocab.allowed_mask("coord" | "class")`` (class positions admit the real classes and NOISE);
``constrained=False`` masks nothing, as the official code generates.

Class scores, as the official post-processing computes them: ``class_probs`` is the softmax of the
model's raw logits over the whole vocabulary (temperature 1, no constraint mask) at the class
position, restricted to ``vocab.class_token_ids`` (label order): it excludes NOISE and every other
token, so it sums to at most 1. The constraint changes which token is generated, never the scores.

Nucleus sampling is the official ``top_logits`` rule (:func:`nucleus_mask`): after dividing by the
temperature, keep the tokens whose cumulative probability, ranked by logit, is <= ``top_p``, plus
the top one; ``top_p >= 1`` keeps everything. Tokens are kept by value, so a token tied with the
smallest kept logit is kept too. Then sample from the kept tokens' renormalised probabilities.

Coordinate readout (``coord_window``, not in the paper): 0 reads each coordinate as its generated
token's bin (the paper). ``w > 0`` reads the expected bin under the coordinate position's
distribution restricted to the bins within ``w * (bins - 1)`` of the generated one. The generated
token (and so what the decoder conditions on) does not change, only the box read out of it: an
undertrained model spreads its probability over neighbouring bins, and their mean is a better box
than the mode (measured on the learning proof: +1.7 to +4.1 AP). The window keeps the mean local, because a
distribution over a whole image row is often multimodal (other objects' edges).

Caching (spec section 5):

- ``"none"``: re-run the decoder over the whole prefix every step, re-projecting the image memory
  for cross-attention every time (the seed's O(n^2) design; the reference path);
- ``"self"``: cache self-attention keys/values per layer, re-project the memory's cross-attention
  keys/values every step (Pretrained-Pix2Seq's design);
- ``"full"``: also project the memory's cross-attention keys/values once per image (ours).

The step of the two cached designs runs as ``step`` says (:mod:`pix2seq.model.compiled_step`):
``"eager"`` calls ``model.decode_step``; ``"graph"`` replays a CUDA graph of the static-shape step;
``"compile"`` runs it through ``torch.compile``; ``"auto"``: graph on CUDA, eager elsewhere. All of
them compute the same function (tokens identical, probabilities equal to float32 rounding).

Decoding always runs the model in eval mode (the mode is restored afterwards) under
:func:`torch.inference_mode`; the loop never synchronises with the device (no ``.item()``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pix2seq.model.compiled_step import compiled_step, resolve_step_mode
from pix2seq.vocab import Vocab

METHODS = ("greedy", "nucleus", "beam")
CACHES = ("full", "self", "none")


@dataclass
class GenerationOutput:
    tokens: Tensor  # (B, 5 * num_objects) long
    class_probs: Tensor  # (B, num_objects, C) float32
    coords: Tensor  # (B, num_objects, 4) float32, in bins
    compile_s: float = 0.0  # building the compiled step in this call (0.0: reused, or eager)


def generate(
    model,
    images: Tensor | None,
    vocab: Vocab,
    num_objects: int,
    method: str = "greedy",
    top_p: float = 0.4,
    temperature: float = 1.0,
    beam_size: int = 4,
    constrained: bool = True,
    cache: str = "full",
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    memory: Tensor | None = None,
    coord_window: float = 0.0,
    step: str = "auto",
    step_autocast: bool = True,
) -> GenerationOutput:
    """Decode ``5 * num_objects`` tokens after the prompt for every image.

    ``images``: uint8 or [0, 1] float ``(B, 3, H, W)``; or pass ``memory`` (``model.encode``'s
    output, ``(B, S, D)``) to skip the encoder (``images`` may then be None). ``generator`` seeds
    nucleus sampling (it must live on the images' device). ``autocast_dtype`` (e.g.
    ``torch.bfloat16``) runs the model under autocast; selection and probabilities are float32.
    ``coord_window``: the coordinate readout's window, a fraction of the coordinate range (module
    docstring; 0 = the token's bin). ``step``: how the cached designs run a step (module docstring).
    ``step_autocast``: False runs the decoding steps in float32 while the encoder keeps
    ``autocast_dtype`` (where the float32 step is the faster one at this many rows, as on CPUs whose
    bf16 kernels cost more per call than they save on a small batch:
    :meth:`pix2seq.precision.Choice.step_dtype`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if num_objects < 0:
        raise ValueError(f"num_objects must be >= 0, got {num_objects}")
    if method == "beam" and beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if method == "nucleus" and not (0.0 < top_p <= 1.0 and temperature > 0):
        raise ValueError(f"need 0 < top_p <= 1 and temperature > 0, got {top_p}, {temperature}")
    if images is None and memory is None:
        raise ValueError("pass images or memory")
    if not 0.0 <= coord_window <= 1.0:
        raise ValueError(f"coord_window must be in [0, 1], got {coord_window}")
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    length = 5 * num_objects
    if length > model.max_seq_len:
        raise ValueError(f"{num_objects} objects need {length} positions; the model has {model.max_seq_len}")

    device = memory.device if memory is not None else images.device
    step = resolve_step_mode(step, device) if cache != "none" else "eager"
    was_training = model.training
    model.eval()
    try:
        step_dtype = autocast_dtype if step_autocast else None
        with torch.inference_mode(), _autocast(device, step_dtype):
            if memory is None:
                with _autocast(device, autocast_dtype):
                    memory = model.encode(images)
            if autocast_dtype is not None and step_dtype is None:
                memory = memory.float()  # the steps' float32 cache
            b = memory.shape[0]
            num_classes = vocab.num_classes
            biases = _position_biases(vocab, device) if constrained else None
            readout = _CoordReadout(vocab, round(coord_window * (vocab.bins - 1)), device)
            compile_s = 0.0
            if length == 0:
                tokens = torch.zeros(b, 0, dtype=torch.long, device=device)
                class_probs = torch.zeros(b, 0, num_classes, device=device)
                coords = None
            else:
                stepper = _Stepper(model, memory, length, cache, step, beam_size if method == "beam" else 1)
                compile_s = stepper.compile_s
                if method == "beam":
                    tokens, class_probs, coords = _beam(
                        stepper, memory, vocab, length, beam_size, biases, readout
                    )
                else:
                    tokens, class_probs, coords = _sequential(
                        stepper, memory, vocab, length, method, top_p, temperature, biases, generator, readout
                    )
            if coords is None:
                coords = readout.from_tokens(tokens)
        # ordinary tensors (not inference tensors): callers may modify them in place
        return GenerationOutput(tokens.clone(), class_probs.clone(), coords.clone(), compile_s)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------ internals


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _position_biases(vocab: Vocab, device: torch.device) -> tuple[Tensor, Tensor]:
    """Additive float32 masks ``(V,)``: 0 where allowed, -inf elsewhere, for (coord, class) positions."""
    out = []
    for kind in ("coord", "class"):
        allowed = vocab.allowed_mask(kind, device)
        out.append(torch.zeros(vocab.vocab_size, device=device).masked_fill_(~allowed, float("-inf")))
    return out[0], out[1]


class _Stepper:
    """Next-token logits for every row of ``seq`` at step ``t``, under one caching strategy and step mode."""

    def __init__(self, model, memory: Tensor, length: int, cache: str, step: str, repeat: int = 1) -> None:
        self.model = model
        self.state = self.unit = None
        self.compile_s = 0.0
        if cache == "none":
            self.memory = memory.repeat_interleave(repeat, 0) if repeat > 1 else memory
        elif step == "eager":
            self.state = model.init_cache(memory, length, cross=cache, repeat=repeat)
        else:
            self.unit = compiled_step(model, memory, length, cache, repeat, step)
            self.compile_s = self.unit.compile_s

    def __call__(self, seq: Tensor, t: int) -> Tensor:
        """``seq (R, 1 + length)`` holds the prompt and tokens ``< t``; returns logits ``(R, V)`` float32."""
        if self.unit is not None:
            logits = self.unit(seq.select(1, t), t)
        elif self.state is not None:
            logits = self.model.decode_step(seq.select(1, t), self.state)
        else:
            logits = self.model.decode(seq[:, : t + 1], self.memory, last_only=True)
        return logits.float()

    def reorder(self, index: Tensor) -> None:
        if self.unit is not None:
            self.unit.reorder(index)
        elif self.state is not None:
            self.state.reorder(index)


class _CoordReadout:
    """The continuous bin read out at a coordinate position (see the module docstring)."""

    def __init__(self, vocab: Vocab, window: int, device: torch.device) -> None:
        self.start, self.bins, self.window = vocab.coord_start, vocab.bins, window
        self.grid = torch.arange(vocab.bins, device=device, dtype=torch.float32)  # (nb,)

    def bins_of(self, tokens: Tensor) -> Tensor:
        """Coordinate tokens -> their own bins, float32 (the paper's readout)."""
        return (tokens - self.start).clamp(0, self.bins - 1).float()

    def from_tokens(self, tokens: Tensor) -> Tensor:
        """``(B, 5M)`` generated tokens -> ``(B, M, 4)`` their coordinate bins (window 0)."""
        return self.bins_of(tokens.view(tokens.shape[0], -1, 5)[..., :4])

    def __call__(self, logits: Tensor, chosen: Tensor) -> Tensor:
        """``logits (R, V)`` float32 and the chosen tokens ``(R,)`` -> bins ``(R,)`` float32 (window > 0;
        with window 0 the loops skip it and :meth:`from_tokens` reads the bins once at the end)."""
        q = self.bins_of(chosen)
        # softmax restricted to the coordinate range equals the full one renormalised in the window
        p = logits[:, self.start : self.start + self.bins].softmax(-1)  # (R, nb)
        p = p * ((self.grid - q.unsqueeze(1)).abs() <= self.window)
        return (p * self.grid).sum(1) / p.sum(1).clamp_min(1e-12)


def _check_vocab(logits: Tensor, vocab: Vocab) -> None:
    if logits.shape[-1] != vocab.vocab_size:
        raise ValueError(
            f"the model predicts {logits.shape[-1]} tokens, the vocabulary has {vocab.vocab_size}"
        )


def _sequential(step, memory, vocab, length, method, top_p, temperature, biases, generator, readout):
    """Greedy or nucleus decoding: one token per row per step."""
    b, device = memory.shape[0], memory.device
    class_ids = vocab.class_tokens(device)
    seq = torch.full((b, length + 1), vocab.prompt, dtype=torch.long, device=device)
    class_probs = torch.zeros(b, length // 5, vocab.num_classes, device=device)
    coords = torch.zeros(b, length // 5, 4, device=device) if readout.window else None
    for t in range(length):
        logits = step(seq, t)
        if t == 0:
            _check_vocab(logits, vocab)
        is_class = t % 5 == 4
        if is_class:  # the raw logits' full softmax (the official score)
            class_probs[:, t // 5] = logits.softmax(-1).index_select(1, class_ids)
        if biases is not None:
            logits = logits + biases[is_class]
        if method == "greedy":
            nxt = logits.argmax(-1)
        else:
            nxt = _nucleus(logits, top_p, temperature, generator)
        seq.select(1, t + 1).copy_(nxt)
        if coords is not None and not is_class:
            coords[:, t // 5, t % 5] = readout(logits, nxt)
    return seq[:, 1:].contiguous(), class_probs, coords


def nucleus_mask(logits: Tensor, top_p: float) -> Tensor:
    """``(R, V)`` logits -> bool ``(R, V)``: the tokens official top-p sampling keeps.

    Ranked by logit, a token is kept when the cumulative probability of the tokens up to and
    including it is <= ``top_p``; the top token always is; ``top_p >= 1`` keeps all. The cut is a
    logit value (the smallest kept one), so ties with it are kept as well (official
    ``architectures/transformers.py`` ``top_logits``).
    """
    if top_p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    ranked = logits.sort(-1, descending=True).values
    cum = ranked.softmax(-1).cumsum(-1)
    cut = ranked.masked_fill(cum > top_p, float("inf")).amin(-1, keepdim=True)
    return logits >= torch.minimum(cut, ranked[:, :1])


def _nucleus(logits: Tensor, top_p: float, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Sample from the tokens :func:`nucleus_mask` keeps at ``temperature`` (renormalised)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        logits = logits.masked_fill(~nucleus_mask(logits, top_p), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def _beam(step, memory, vocab, length, k, biases, readout):
    """Batched beam search over ``B * k`` rows; scores are sums of log-probabilities."""
    b, device = memory.shape[0], memory.device
    class_ids = vocab.class_tokens(device)
    v = vocab.vocab_size
    rows = b * k
    seq = torch.full((rows, length + 1), vocab.prompt, dtype=torch.long, device=device)
    class_probs = torch.zeros(rows, length // 5, vocab.num_classes, device=device)
    coords = torch.zeros(rows, length // 5, 4, device=device) if readout.window else None
    # all beams start identical: only the first one may expand at step 0
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    scores = scores.view(rows)
    base = (torch.arange(b, device=device) * k).unsqueeze(1)  # (b, 1): first row of every image
    for t in range(length):
        logits = step(seq, t)
        if t == 0:
            _check_vocab(logits, vocab)
        is_class = t % 5 == 4
        raw = logits
        if biases is not None:
            logits = logits + biases[is_class]
        cand = (scores.unsqueeze(1) + logits.log_softmax(-1)).view(b, k * v)
        top, idx = cand.topk(k, dim=1)  # (b, k), best first
        parent = (torch.div(idx, v, rounding_mode="floor") + base).view(rows)
        seq = seq.index_select(0, parent)
        seq.select(1, t + 1).copy_((idx % v).view(rows))
        class_probs = class_probs.index_select(0, parent)
        if is_class:
            class_probs[:, t // 5] = raw.softmax(-1).index_select(1, class_ids).index_select(0, parent)
        if coords is not None:
            coords = coords.index_select(0, parent)
            if not is_class:
                coords[:, t // 5, t % 5] = readout(logits.index_select(0, parent), seq[:, t + 1])
        scores = top.view(rows)
        step.reorder(parent)
    best = scores.view(b, k).argmax(1) + base.squeeze(1)
    return seq[best, 1:].contiguous(), class_probs[best], None if coords is None else coords[best]


__all__ = ["CACHES", "METHODS", "GenerationOutput", "generate", "nucleus_mask"]
