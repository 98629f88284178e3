"""Region masks from a plan's layout: where each OBJECT entry's tokens may act (plan-grounded spatial injection).

A plan's OBJECT entries name regions (``1 medium red circle at left``, ``2 blue squares at top, bottom``).
`RegionGrid` says where each region name lies on the canvas (a 3x3 grid by default: ``top left`` ... ``center``
... ``bottom right``, centers at 1/4, 1/2 and 3/4 of each side) and how large a box an object gets; an entry's
mask is the union of soft-edged boxes at its positions. Entries without positions, or with names the grid does
not know, get no mask, and a plan none of whose objects is placed has no regions at all (today's behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from planner.schema import Plan, PlanError

GRID_3X3: dict[str, tuple[float, float]] = {
    name: (0.25 + 0.25 * (i % 3), 0.25 + 0.25 * (i // 3))
    for i, name in enumerate(
        ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
    )
}


@dataclass(frozen=True)
class RegionGrid:
    """Region name -> box center (x, y in [0, 1], origin top left); boxes of side ``box`` with soft edges."""

    centers: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(GRID_3X3))
    box: float = 0.5  # side of an object's box as a fraction of the canvas (toy objects span 0.25-0.47)
    softness: float = 0.125  # width of the linear ramp at the box edge, as a fraction of the canvas

    def box_mask(self, center: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
        """(H, W) soft box around ``center``, evaluated at the centers of an H x W grid of cells."""
        h, w = size
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        half = self.box / 2

        def ramp(d: torch.Tensor) -> torch.Tensor:
            if self.softness <= 0:
                return (d <= half).float()
            return ((half + self.softness / 2 - d) / self.softness).clamp(0.0, 1.0)

        return ramp((ys - center[1]).abs())[:, None] * ramp((xs - center[0]).abs())[None, :]


def object_positions(plan: Plan | str) -> list[tuple[str, ...]]:
    """Positions named by each OBJECT entry (``... at left, right`` -> ("left", "right")); () when unplaced."""
    if isinstance(plan, str):
        plan = Plan.parse(plan)
    out = []
    for text in plan.objects:
        _, sep, tail = text.partition(" at ")
        out.append(tuple(p.strip() for p in tail.split(",") if p.strip()) if sep else ())
    return out


def plan_region_masks(plan: Plan | str, size: tuple[int, int], grid: RegionGrid | None = None) -> torch.Tensor | None:
    """(K, H, W) masks of a plan's K OBJECT entries (an unplaced entry: all zeros), or None if none is placed."""
    grid = grid or RegionGrid()
    try:
        positions = object_positions(plan)
    except PlanError as err:
        raise err.with_context("region masks") from None
    masks = torch.zeros(len(positions), *size)
    placed = False
    for k, names in enumerate(positions):
        known = [n for n in names if n in grid.centers]
        for name in known:
            masks[k] = torch.maximum(masks[k], grid.box_mask(grid.centers[name], size))
        placed |= bool(known)
    return masks if placed else None


def batch_region_masks(
    plans: list[Plan | str | None], size: tuple[int, int], grid: RegionGrid | None = None
) -> torch.Tensor | None:
    """(B, K, H, W) masks for a batch (K: the most entries of any row; missing rows/entries are zeros), or None
    when no row has a placed object."""
    per_row = [None if p is None else plan_region_masks(p, size, grid) for p in plans]
    if all(m is None for m in per_row):
        return None
    k = max(m.shape[0] for m in per_row if m is not None)
    out = torch.zeros(len(plans), k, *size)
    for b, m in enumerate(per_row):
        if m is not None:
            out[b, : m.shape[0]] = m
    return out
