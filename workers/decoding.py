"""One generation's state and token choice, step by step, as transformers' ``generate`` does it.

``Decoding`` holds what a ``generate`` call decides — how many tokens, stop tokens, the pad token,
greedy or sampled (temperature, top-k, top-p, seed) — and ``Decoder`` runs it over the logits of each
step: it applies transformers' own logits warpers in transformers' order (temperature, top-k, top-p),
picks the token (``argmax``, or ``torch.multinomial`` over the softmax with a ``torch.Generator`` seeded
with ``seed``: one draw per sequence per step, as transformers draws them from torch's global
generator, so ``torch.manual_seed(seed)`` before transformers' ``generate`` gives the same draws),
pads sequences that have stopped, and builds the next step's inputs: for a batch of prompts of
different lengths, left padding with an attention mask, position ids counted over the real tokens
(as ``_prepare_position_ids_for_generation``), the mask extended by one per step, dropped when it has
no padding (as transformers drops it).

Pure torch; runs where the last stage's logits are: inside the ranks (``RankWorker.decode``, pp == 1)
or on the driver (pipeline stages).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class Decoding:
    """What one ``generate`` call asks for (checked on construction)."""

    max_new_tokens: int
    eos: tuple[int, ...] = ()  # stop tokens: a sequence that produces one is padded from then on
    pad: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0  # the sampler's seed (the driver draws one per call when the caller gives none)
    vocab_size: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k={self.top_k!r} must be a non-negative integer (0 or None: no top-k)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1]")
        if not self.do_sample and (self.temperature != 1.0 or self.top_k or (self.top_p or 1.0) < 1.0):
            raise ValueError("temperature, top_k and top_p apply to sampling: pass do_sample=True (greedy ignores them)")
        if self.vocab_size is not None:
            bad = [t for t in (*self.eos, self.pad) if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"stop/pad token ids {bad} lie outside the vocabulary [0, {self.vocab_size})")

    def warpers(self):
        """transformers' own logits warpers for this call, in the order its ``generate`` applies them."""
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = LogitsProcessorList()
        if self.do_sample:
            if self.temperature != 1.0:
                out.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                out.append(TopKLogitsWarper(top_k=self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                out.append(TopPLogitsWarper(top_p=self.top_p))
        return out


class Decoder:
    """The running state of one generation over a batch (see module docstring).

    ``takes_position_ids``: the model's forward accepts ``position_ids`` (then they are passed, counted
    over the real tokens of each left-padded prompt)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, decoding: Decoding, *,
                 takes_position_ids: bool = True) -> None:
        self.decoding = decoding
        self.ids = input_ids
        self.warpers = decoding.warpers()
        self.generator = torch.Generator().manual_seed(decoding.seed) if decoding.do_sample else None
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
        self.mask = attention_mask.long() if attention_mask is not None else None
        self.positions = None
        if takes_position_ids and self.mask is not None:
            self.positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        self.steps = 0

    @property
    def done(self) -> bool:
        return self.steps >= self.decoding.max_new_tokens or not bool(self.unfinished.any())

    def inputs(self) -> tuple[torch.Tensor, dict]:
        """This step's input ids and keyword arguments (the prompt first, then the last token)."""
        ids = self.ids if self.steps == 0 else self.ids[:, -1:]
        kwargs = {}
        if self.mask is not None and not bool(self.mask.all()):
            kwargs["attention_mask"] = self.mask
        if self.positions is not None:
            kwargs["position_ids"] = self.positions[:, -ids.shape[1]:]
        return ids, kwargs

    def choose(self, last_logits: torch.Tensor) -> torch.Tensor:
        """The next token of every sequence from this step's last-position logits (batch × vocab)."""
        scores = self.warpers(self.ids, last_logits.to(dtype=torch.float32, device="cpu", copy=True))
        if self.decoding.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
        return torch.argmax(scores, dim=-1)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Record this step's tokens (finished sequences padded); returns them as recorded."""
        d = self.decoding
        if d.eos:
            tokens = torch.where(self.unfinished, tokens, torch.full_like(tokens, d.pad))
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=-1)
        if d.eos:
            self.unfinished &= ~torch.isin(tokens, torch.tensor(d.eos))
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
        if self.positions is not None:
            self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=-1)
        self.steps += 1
        return tokens
