"""Plan revision: the planner LLM reads a prompt, the plan an image was made from and the critique of that image,
and writes a revised plan (the refine loop's ``revise`` move).

A reviser is a `Planner` (any local causal LM with the planning tokens) whose request is the prompt followed by
the draft plan and the critique (`revision_request`), so it decodes under the same constrained decoding and every
revision parses. The toy reviser is the toy writer fine-tuned with TRL SFT on (prompt, draft plan, critique) ->
plan rows mined on *training-family* prompts (``scripts/train_reviser.py``): drafts the writer got wrong (sampled
plans, and the wrong-relation / wrong-attribute corruptions the writer makes) with the critique of the image each
draft produced, answered by the prompt's plan; and drafts that were right, answered by themselves (a right plan
whose image failed is the U-Net's fault, not the plan's: the loop answers it with another move).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from planner.planner import Planner, PlanResult, is_adapter_dir
from planner.schema import IMG_BEGIN, IMG_END, Plan, PlanSpec
from safeio import InputError

MATCHES = "The image matches the plan."


def draft_text(plan: Plan | str) -> str:
    """A plan as the reviser reads it inside its request: its tagged fields without the begin/end markers (those
    mean "a plan starts / ends here" to a planner)."""
    text = plan.to_text() if isinstance(plan, Plan) else plan
    return " ".join(text.replace(IMG_BEGIN, "").replace(IMG_END, "").split())


def revision_request(prompt: str, plan: Plan | str, critique_text: str | None) -> str:
    """The reviser's request: ``"<prompt> | draft: <plan fields> | critique: <critique>"``."""
    return f"{prompt} | draft: {draft_text(plan)} | critique: {critique_text or MATCHES}"


def reviser_stack(writer: str | Path | None, reviser: str | Path, planner: str | Path) -> tuple[str, list[str]]:
    """The planner folder and the adapters merged over it, in order, for a reviser LoRA adapter trained on
    ``writer``: a writer adapter goes under the reviser over ``planner`` (the LM both were trained on); a writer
    folder is the base itself; without a writer the reviser goes over ``planner`` alone."""
    if writer is None:
        return str(planner), [str(reviser)]
    if is_adapter_dir(writer):
        return str(planner), [str(writer), str(reviser)]
    return str(writer), [str(reviser)]


class PlanReviser:
    """Revises plans with a planner LLM: ``revise(prompts, plans, critiques)`` returns one `PlanResult` each."""

    def __init__(self, planner: Planner):
        self.planner = planner

    @classmethod
    def from_pretrained(cls, path: str | Path, *, spec: PlanSpec | None = None,
                        adapter: str | Path | Sequence[str | Path] | None = None, device=None,
                        dtype: torch.dtype | None = None) -> PlanReviser:  # fmt: skip
        """A reviser from a local planner folder (with ``adapter``: LoRA adapters merged in order)."""
        return cls(Planner.from_pretrained(path, spec=spec, adapter=adapter, device=device, dtype=dtype))

    @property
    def plan_spec(self) -> PlanSpec:
        return self.planner.plan_spec

    def revise(self, prompts: Sequence[str], plans: Sequence[Plan | str],
               critiques: Sequence[str | None]) -> list[PlanResult]:  # fmt: skip
        """A revised plan per (prompt, plan, critique text); a result with ``plan=None`` says why it failed."""
        if not len(prompts) == len(plans) == len(critiques):
            raise InputError(f"revise needs one plan and one critique per prompt: got {len(prompts)} prompts, "
                             f"{len(plans)} plans and {len(critiques)} critiques")  # fmt: skip
        requests = [revision_request(p, d, c) for p, d, c in zip(prompts, plans, critiques)]
        return self.planner.plan(requests)
