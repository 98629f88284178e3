"""Hidden states of a decoder LLM over a plan: teacher-forced prompt + plan, the planning span sliced out.

`PlanEncoder.encode(prompts, plans)` runs the LLM once on ``format_prompt(prompt) + plan`` and returns
`PlanStates`: the states of the tokens from ``<IMG_BEGIN>`` to ``<IMG_END>`` (the plan span only), their
mask, and which plan field each token belongs to (for hierarchical injection).

Layer selection (DESIGN.md "Evidence": for decoder LLMs a layer-normalised mean of all layers beats the
last layer): ``last``; a list of layer indices (their normalised mean); ``mean`` (normalised mean of all
layers, the default); ``learned`` (all layers are returned and a `LayerSelector` in the connector learns
softmax weights over them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from planner.schema import FIELD_TAGS, FIELDS, IMG_BEGIN, IMG_END
from planner.tokens import format_prompt

FIELD_INDEX = {name: i + 1 for i, name in enumerate(FIELDS)}  # 0: begin/end markers


@dataclass
class PlanStates:
    states: torch.Tensor  # (B, T, d) selected, or (B, L, T, d) all layers for learned selection
    mask: torch.Tensor  # (B, T) bool
    field_ids: torch.Tensor  # (B, T) long: 0 for <IMG_BEGIN>/<IMG_END>, FIELD_INDEX of the field otherwise
    object_ids: torch.Tensor | None = None  # (B, T) long: k for the k-th OBJECT entry (1-based, its tag included)

    def to(self, device=None, dtype=None) -> PlanStates:
        return PlanStates(
            self.states.to(device=device, dtype=dtype),
            self.mask.to(device),
            self.field_ids.to(device),
            None if self.object_ids is None else self.object_ids.to(device),
        )

    def index(self, idx) -> PlanStates:
        objects = None if self.object_ids is None else self.object_ids[idx]
        return PlanStates(self.states[idx], self.mask[idx], self.field_ids[idx], objects)

    @staticmethod
    def cat(items: list[PlanStates]) -> PlanStates:
        t = max(x.mask.shape[1] for x in items)

        def pad(x, value=0):
            extra = t - x.shape[1]
            if x.ndim == 2:
                return F.pad(x, (0, extra), value=value)
            if x.ndim == 3:
                return F.pad(x, (0, 0, 0, extra), value=value)
            return F.pad(x, (0, 0, 0, extra), value=value)  # (B, L, T, d): pad T

        states = []
        for x in items:
            s = x.states
            if s.ndim == 4:
                s = F.pad(s, (0, 0, 0, t - s.shape[2]))
            else:
                s = pad(s)
            states.append(s)
        objects = None
        if all(x.object_ids is not None for x in items):
            objects = torch.cat([pad(x.object_ids) for x in items])
        return PlanStates(
            torch.cat(states),
            torch.cat([pad(x.mask, False) for x in items]),
            torch.cat([pad(x.field_ids) for x in items]),
            objects,
        )


def normalized_mean(hidden: torch.Tensor) -> torch.Tensor:
    """(B, L, T, d) -> (B, T, d): LayerNorm (no affine) per layer, then the mean over layers."""
    return F.layer_norm(hidden.float(), hidden.shape[-1:]).mean(dim=1).to(hidden.dtype)


def select_layers(hidden: tuple[torch.Tensor, ...], layers: str | list[int]) -> torch.Tensor:
    """Apply a layer selection to HF ``hidden_states`` (embeddings output + one per block)."""
    if layers == "last":
        return hidden[-1]
    stacked = torch.stack(hidden[1:], dim=1)  # (B, L, T, d), block outputs only
    if layers == "mean":
        return normalized_mean(stacked)
    if layers == "learned":
        return stacked
    if isinstance(layers, (list, tuple)):
        n = len(hidden) - 1
        bad = [i for i in layers if not -n <= i < n]
        if bad or not layers:
            raise ValueError(f"layer indices {layers} out of range for an LLM with {n} blocks")
        return normalized_mean(stacked[:, list(layers)])
    raise ValueError(f"unknown layer selection {layers!r}; use 'last', 'mean', 'learned' or a list of indices")


class PlanEncoder:
    """Runs an HF causal LM over prompt + plan and slices the plan span's hidden states."""

    def __init__(self, model, tokenizer, layers: str | list[int] = "mean"):
        self.model = model
        self.tokenizer = tokenizer
        self.layers = layers
        select_layers((torch.zeros(1, 1, 1),) * 3, layers)  # validate the selection early
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMG_BEGIN, IMG_END, *FIELD_TAGS.values()) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks planning tokens {missing}: add them with add_planning_tokens")
        self.begin_id = tokenizer.convert_tokens_to_ids(IMG_BEGIN)
        self.end_id = tokenizer.convert_tokens_to_ids(IMG_END)
        self.tag_field = {tokenizer.convert_tokens_to_ids(t): FIELD_INDEX[n] for n, t in FIELD_TAGS.items()}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def texts(self, prompts: list[str], plans: list[str] | None) -> list[str]:
        """Prompt format + plan text; with ``plans=None`` the formatted prompt alone (the no-planner ablation)."""
        if plans is None:
            return [format_prompt(self.tokenizer, p) for p in prompts]
        if len(plans) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plans)} plans")
        return [format_prompt(self.tokenizer, p) + " " + plan for p, plan in zip(prompts, plans)]

    def encode(self, prompts: list[str], plans: list[str] | None, grad: bool = False) -> PlanStates:
        """Teacher-forced forward; returns the plan span (``plans=None``: the formatted prompt alone)."""
        return self.encode_with_lm_loss(prompts, plans, grad=grad, lm_loss=False)[0]

    def encode_with_lm_loss(
        self, prompts: list[str], plans: list[str] | None, grad: bool = False, lm_loss: bool = True
    ) -> tuple[PlanStates, torch.Tensor | None]:
        """`encode` plus the language-modelling loss on the plan tokens (what keeps a fine-tuned LLM planning)."""
        texts = self.texts(prompts, plans)
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        finally:
            self.tokenizer.padding_side = side
        ids = enc["input_ids"].to(self.device)
        attn = enc["attention_mask"].to(self.device)
        with torch.set_grad_enabled(grad):
            out = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
        hidden = select_layers(out.hidden_states, self.layers)
        lengths = attn.sum(1).tolist()
        states = self.slice_plan(ids, hidden, None if plans is not None else [(0, n) for n in lengths])
        loss = None
        if lm_loss and plans is not None:
            labels = torch.full_like(ids, -100)
            for b in range(ids.shape[0]):
                row = ids[b].tolist()
                start = len(row) - 1 - row[::-1].index(self.begin_id)
                end = row.index(self.end_id, start)
                labels[b, start + 1 : end + 1] = ids[b, start + 1 : end + 1]  # predict the plan after <IMG_BEGIN>
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return states, loss

    def slice_plan(
        self, ids: torch.Tensor, hidden: torch.Tensor, spans: list[tuple[int, int]] | None = None
    ) -> PlanStates:
        """Cut each row's ``<IMG_BEGIN> ... <IMG_END>`` span (or the given spans) out of ``hidden``
        ((B, T, d) or (B, L, T, d))."""
        if spans is not None:
            return self._gather(ids, hidden, spans)
        spans = []
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            if self.begin_id not in row or self.end_id not in row:
                raise ValueError(f"row {b} has no complete {IMG_BEGIN} ... {IMG_END} span")
            start = len(row) - 1 - row[::-1].index(self.begin_id)  # the last begin marker: the plan's own
            end = row.index(self.end_id, start)
            spans.append((start, end + 1))
        return self._gather(ids, hidden, spans)

    def _gather(self, ids: torch.Tensor, hidden: torch.Tensor, spans: list[tuple[int, int]]) -> PlanStates:
        t = max(e - s for s, e in spans)
        learned = hidden.ndim == 4
        shape = (
            (ids.shape[0], hidden.shape[1], t, hidden.shape[-1]) if learned else (ids.shape[0], t, hidden.shape[-1])
        )
        states = hidden.new_zeros(shape)
        mask = torch.zeros(ids.shape[0], t, dtype=torch.bool, device=ids.device)
        fields = torch.zeros(ids.shape[0], t, dtype=torch.long, device=ids.device)
        objects = torch.zeros_like(fields)
        object_field = FIELD_INDEX["OBJECT"]
        for b, (s, e) in enumerate(spans):
            if learned:
                states[b, :, : e - s] = hidden[b, :, s:e]
            else:
                states[b, : e - s] = hidden[b, s:e]
            mask[b, : e - s] = True
            current, k = 0, 0
            for j, tok in enumerate(ids[b, s:e].tolist()):
                if tok in self.tag_field:
                    current = self.tag_field[tok]
                    k += current == object_field
                f = 0 if tok in (self.begin_id, self.end_id) else current
                fields[b, j] = f
                objects[b, j] = k if f == object_field else 0
        return PlanStates(states, mask, fields, objects)
