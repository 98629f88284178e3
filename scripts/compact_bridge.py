"""Rewrite a bridge folder's LLM / U-Net deltas compactly: entries equal to the base weights are dropped, and a
full weight whose change from the base has rank <= R is stored as low-rank factors (``NAME::lora_down`` /
``NAME::lora_up``). For bridges exported with merged LoRA weights; the result loads to the same weights (checked).

    python scripts/compact_bridge.py --bridge runs/bridge_ABC/stage-ABC --out runs/bridge_ABC/stage-ABC-compact
"""

import argparse
import shutil
from pathlib import Path

import torch

from diffusion_backbone.models import load_backbone
from llm_bridge.bridge import LOW_RANK_DOWN, LOW_RANK_UP, LLMBridge, apply_delta
from planner.planner import Planner
from toyworld.pretrained import pretrained_path
from toyworld.vocab import TOY_PLAN_SPEC


def compact(delta: dict, base: dict, max_rank: int, tol: float) -> dict:
    out = {}
    for k, w in delta.items():
        if "::" in k:
            out[k] = w
            continue
        change = w.float() - base[k].detach().float()
        if change.abs().max() == 0:
            continue
        if change.ndim == 2 and max_rank * sum(change.shape) < change.numel():
            u, s, vh = torch.linalg.svd(change.double(), full_matrices=False)
            r = max_rank
            approx = (u[:, :r] * s[:r]) @ vh[:r]
            if (approx - change.double()).abs().max() <= tol * change.abs().max():
                out[k + LOW_RANK_UP] = (u[:, :r] * s[:r]).float().contiguous()
                out[k + LOW_RANK_DOWN] = vh[:r].float().contiguous()
                continue
        out[k] = w
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bridge", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--planner", default=None)
    p.add_argument("--base", default=None)
    p.add_argument("--max-rank", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-3, help="max reconstruction error relative to the change")
    args = p.parse_args()
    bridge = LLMBridge.from_pretrained(args.bridge)
    llm = Planner.from_pretrained(args.planner or pretrained_path("planner"), spec=TOY_PLAN_SPEC).model
    unet = load_backbone(args.base or pretrained_path("base")).unet
    for attr, model in (("llm_delta", llm), ("unet_delta", unet)):
        full = getattr(bridge, attr)
        small = compact(full, dict(model.named_parameters()), args.max_rank, args.tol)
        ref = {n: p.detach().clone() for n, p in model.named_parameters()}
        apply_delta(model, full, attr)
        want = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(ref[n])
        apply_delta(model, small, attr)
        err = max((p.detach() - want[n]).abs().max().item() for n, p in model.named_parameters())
        n_full, n_small = sum(v.numel() for v in full.values()), sum(v.numel() for v in small.values())
        print(f"{attr}: {n_full} -> {n_small} numbers, max weight error {err:.2e}")
        setattr(bridge, attr, small)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    bridge.save_pretrained(out)
    print(f"wrote {out}")
