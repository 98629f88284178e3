"""`Conditioning`: the only thing the U-Net side knows about its conditioning.

A native text encoder, the LLM bridge and a learned null all produce one. ``tokens`` feed the U-Net's
cross-attention (the "what"); ``pooled`` is an optional global vector (the "how", e.g. through a
zero-initialised modulation of the time embedding); ``per_depth`` optionally routes different tokens to
different U-Net blocks (hierarchical injection); ``regions`` optionally confines groups of tokens to regions of
the image (plan-grounded spatial injection, see `Regions`); ``time_ids`` are SDXL's size and crop
micro-conditioning (with ``pooled`` as its ``text_embeds``: the U-Net's ``added_cond_kwargs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Regions:
    """Which tokens act where: token groups tied to soft region masks (plan-grounded spatial injection).

    Token ``j`` of row ``b`` belongs to region ``token_region[b, j]`` (0: a global token that acts everywhere;
    ``k >= 1``: it acts only inside ``masks[b, k - 1]``). At a cross-attention layer whose map is the mask
    resolution divided by ``2**level``, with ``level`` in ``levels`` (None: every layer), the masks are
    area-pooled to the map and the logits of region tokens get ``log(1 - strength + strength * mask)``: with
    ``strength`` 1 a token gets no attention outside its region, with 0 the layer is unchanged.
    """

    token_region: torch.Tensor  # (B, M) long
    masks: torch.Tensor  # (B, K, H, W) float in [0, 1], at the latent resolution
    strength: float = 1.0
    levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.token_region.ndim != 2 or self.token_region.dtype != torch.long:
            raise ValueError(f"Regions.token_region must be a (B, M) long tensor, got {_shape(self.token_region)}")
        if self.masks.ndim != 4 or self.masks.shape[0] != self.token_region.shape[0]:
            raise ValueError(
                f"Regions.masks must be a (B={self.token_region.shape[0]}, K, H, W) tensor, got {_shape(self.masks)}"
            )
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"Regions.strength must be in [0, 1], got {self.strength}")
        if self.levels is not None:
            self.levels = tuple(int(v) for v in self.levels)

    @property
    def num_regions(self) -> int:
        return self.masks.shape[1]

    def with_tokens(self, before: int = 0, after: int = 0) -> Regions:
        """The same regions with ``before``/``after`` global tokens added around the current ones."""
        tr = torch.nn.functional.pad(self.token_region, (before, after), value=0)
        return Regions(tr, self.masks, self.strength, self.levels)

    def to(self, device=None, dtype=None) -> Regions:
        return Regions(
            self.token_region.to(device), self.masks.to(device=device, dtype=dtype), self.strength, self.levels
        )

    def index(self, idx) -> Regions:
        return Regions(self.token_region[idx], self.masks[idx], self.strength, self.levels)

    @staticmethod
    def empty(batch_size: int, num_tokens: int, like: Regions) -> Regions:
        """Rows with only global tokens, shaped to be concatenated with ``like``."""
        tr = torch.zeros(batch_size, num_tokens, dtype=torch.long, device=like.token_region.device)
        masks = like.masks.new_zeros((batch_size, *like.masks.shape[1:]))
        return Regions(tr, masks, like.strength, like.levels)

    @staticmethod
    def cat(items: list[Regions], num_tokens: int) -> Regions:
        """Concatenate rows, padding tokens (global, masked anyway) to ``num_tokens`` and regions to the most."""
        settings = {(r.strength, r.levels) for r in items}
        if len(settings) > 1:
            raise ValueError(f"cannot batch regions with different strength/levels: {sorted(settings, key=str)}")
        k = max(r.num_regions for r in items)
        tr = [torch.nn.functional.pad(r.token_region, (0, num_tokens - r.token_region.shape[1])) for r in items]
        masks = [torch.nn.functional.pad(r.masks, (0, 0, 0, 0, 0, k - r.num_regions)) for r in items]
        return Regions(torch.cat(tr), torch.cat(masks), items[0].strength, items[0].levels)


@dataclass
class Conditioning:
    tokens: torch.Tensor  # (B, M, d_ctx): keys/values of the U-Net's cross-attention
    mask: torch.Tensor | None = None  # (B, M) bool, True = attend; None = all tokens valid
    pooled: torch.Tensor | None = None  # (B, d_g) global vector
    per_depth: dict[str, Conditioning] | None = field(default=None)  # depth group -> its own tokens and mask
    regions: Regions | None = None  # token groups confined to image regions (None: every token acts everywhere)
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL: original size, crop top-left, target size

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.ndim != 3:
            raise ValueError(f"Conditioning.tokens must be a (B, M, d) tensor, got {_shape(self.tokens)}")
        b, m, _ = self.tokens.shape
        if self.mask is not None and (self.mask.shape != (b, m) or self.mask.dtype != torch.bool):
            raise ValueError(f"Conditioning.mask must be a ({b}, {m}) bool tensor, got {_shape(self.mask)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != b):
            raise ValueError(f"Conditioning.pooled must be a ({b}, d) tensor, got {_shape(self.pooled)}")
        if self.time_ids is not None and (self.time_ids.ndim != 2 or self.time_ids.shape[0] != b):
            raise ValueError(f"Conditioning.time_ids must be a ({b}, 6) tensor, got {_shape(self.time_ids)}")
        for name, c in (self.per_depth or {}).items():
            if not isinstance(c, Conditioning) or c.batch_size != b or c.dim != self.dim:
                raise ValueError(
                    f"Conditioning.per_depth[{name!r}] must be a Conditioning of batch {b}, width {self.dim}"
                )
        if self.regions is not None:
            if self.regions.token_region.shape != (b, m):
                raise ValueError(
                    f"Conditioning.regions.token_region must be ({b}, {m}), got {_shape(self.regions.token_region)}"
                )
            if self.per_depth is not None:
                raise ValueError("Conditioning: regions and per_depth (hierarchical injection) cannot be combined")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    def to(self, device=None, dtype=None) -> Conditioning:
        """Move to a device / cast floating tensors to a dtype (the mask stays bool)."""

        def mv(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        per_depth = None if self.per_depth is None else {k: v.to(device, dtype) for k, v in self.per_depth.items()}
        regions = None if self.regions is None else self.regions.to(device, dtype)
        return Conditioning(mv(self.tokens), mv(self.mask), mv(self.pooled), per_depth, regions, mv(self.time_ids))

    def to_prompt_embeds(self) -> torch.Tensor:
        """The ``prompt_embeds`` a stock diffusers pipeline accepts: tokens with masked positions zeroed.

        Stock pipelines have no attention mask for ``prompt_embeds``; zeroed padding is what a padded
        text encoder would contribute least. Pass the mask to our own sampler to ignore padding exactly.
        """
        if self.mask is None:
            return self.tokens
        return self.tokens * self.mask[..., None].to(self.tokens.dtype)

    def attention_bias(self) -> torch.Tensor | None:
        """``encoder_attention_mask`` for diffusers' U-Net: (B, M) with 1 = keep, 0 = discard."""
        return None if self.mask is None else self.mask.to(self.tokens.dtype)

    def concat_tokens(self, other: Conditioning) -> Conditioning:
        """Tokens of ``self`` followed by those of ``other`` (e.g. native text tokens, then connector tokens)."""
        if other.batch_size != self.batch_size or other.dim != self.dim:
            raise ValueError(
                f"cannot concatenate conditionings of batch/width {self.batch_size}/{self.dim} and "
                f"{other.batch_size}/{other.dim}"
            )

        def full(c):
            return (
                c.mask
                if c.mask is not None
                else torch.ones(c.tokens.shape[:2], dtype=torch.bool, device=c.tokens.device)
            )

        mask = None
        if self.mask is not None or other.mask is not None:
            mask = torch.cat([full(self), full(other)], dim=1)
        pooled = other.pooled if other.pooled is not None else self.pooled
        per_depth = None
        if other.per_depth is not None:
            per_depth = {k: self.concat_tokens(v) for k, v in other.per_depth.items()}
        regions = _concat_regions(self, other)
        time_ids = other.time_ids if other.time_ids is not None else self.time_ids
        tokens = torch.cat([self.tokens, other.tokens], dim=1)
        return Conditioning(tokens, mask, pooled, per_depth, regions, time_ids)

    def index(self, idx) -> Conditioning:
        """Select rows of the batch."""

        def sel(t):
            return None if t is None else t[idx]

        per_depth = None if self.per_depth is None else {k: v.index(idx) for k, v in self.per_depth.items()}
        regions = None if self.regions is None else self.regions.index(idx)
        return Conditioning(sel(self.tokens), sel(self.mask), sel(self.pooled), per_depth, regions, sel(self.time_ids))

    def repeat(self, n: int) -> Conditioning:
        """Repeat each row ``n`` times (row i -> rows i*n .. i*n+n-1), e.g. for several images per prompt."""
        return self.index(torch.arange(self.batch_size, device=self.tokens.device).repeat_interleave(n))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch, padding token counts to the longest (padding masked out)."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        m = max(c.tokens.shape[1] for c in items)
        tokens, masks = [], []
        for c in items:
            pad = m - c.tokens.shape[1]
            mask = (
                c.mask
                if c.mask is not None
                else torch.ones(c.tokens.shape[:2], dtype=torch.bool, device=c.tokens.device)
            )
            tokens.append(torch.nn.functional.pad(c.tokens, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(mask, (0, pad), value=False))
        any_mask = any(c.mask is not None for c in items) or len({c.tokens.shape[1] for c in items}) > 1
        pooled = _cat_optional(items, "pooled", "a pooled vector")
        time_ids = _cat_optional(items, "time_ids", "time_ids")
        per_depth = None
        if all(c.per_depth is not None for c in items):
            keys = set(items[0].per_depth)
            if any(set(c.per_depth) != keys for c in items):
                raise ValueError("Conditioning.cat: per_depth keys differ")
            per_depth = {k: Conditioning.cat([c.per_depth[k] for c in items]) for k in keys}
        elif any(c.per_depth is not None for c in items):
            raise ValueError("Conditioning.cat: either all items have per_depth conditionings or none")
        regions = None
        with_regions = [c.regions for c in items if c.regions is not None]
        if with_regions:  # rows without regions (e.g. the unconditional branch of CFG) get global tokens only
            rows = [c.regions or Regions.empty(c.batch_size, c.tokens.shape[1], with_regions[0]) for c in items]
            regions = Regions.cat(rows, m)
        mask = torch.cat(masks) if any_mask else None
        return Conditioning(torch.cat(tokens), mask, pooled, per_depth, regions, time_ids)


def _cat_optional(items: list[Conditioning], name: str, what: str) -> torch.Tensor | None:
    values = [getattr(c, name) for c in items]
    if all(v is not None for v in values):
        return torch.cat(values)
    if any(v is not None for v in values):
        raise ValueError(f"Conditioning.cat: either all items have {what} or none")
    return None


def _concat_regions(first: Conditioning, second: Conditioning) -> Regions | None:
    """Regions of ``first``'s tokens followed by ``second``'s (region ids of ``second`` come after ``first``'s)."""
    a, b = first.regions, second.regions
    if a is None and b is None:
        return None
    m1, m2 = first.tokens.shape[1], second.tokens.shape[1]
    if b is None:
        return a.with_tokens(after=m2)
    if a is None:
        return b.with_tokens(before=m1)
    if (a.strength, a.levels) != (b.strength, b.levels) or a.masks.shape[2:] != b.masks.shape[2:]:
        raise ValueError("cannot concatenate conditionings whose regions differ in strength, levels or mask size")
    shifted = torch.where(b.token_region > 0, b.token_region + a.num_regions, b.token_region)
    return Regions(
        torch.cat([a.token_region, shifted], dim=1), torch.cat([a.masks, b.masks], dim=1), a.strength, a.levels
    )


def _shape(t) -> str:
    return str(tuple(t.shape)) + f" {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def prompt_embeds_pair(cond: Conditioning, uncond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt_embeds`` and ``negative_prompt_embeds`` for a stock diffusers pipeline (same shape required).

    When the token counts differ, the shorter is padded with zero tokens. Stock pipelines cannot mask them,
    so this is exact only when both have the same length and no padding; our sampler masks padding exactly.
    """
    m = max(cond.tokens.shape[1], uncond.tokens.shape[1])
    if uncond.batch_size == 1 and cond.batch_size > 1:
        uncond = uncond.repeat(cond.batch_size)

    def pad(c: Conditioning) -> torch.Tensor:
        return torch.nn.functional.pad(c.to_prompt_embeds(), (0, 0, 0, m - c.tokens.shape[1]))

    return pad(cond), pad(uncond)
