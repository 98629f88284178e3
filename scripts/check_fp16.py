"""Measure what shipping a base model in fp16 costs: images from the fp32 training export against images from
the fp16-stored copy (both computed in fp32), same prompts, seeds, sampler and steps. Prints a table, writes JSON.

    python scripts/check_fp16.py --fp32 runs/unet/final --fp16 toyworld/pretrained/base --out runs/check_fp16.json
"""

import argparse
import json

import numpy as np

from diffusion_backbone.models import load_backbone
from diffusion_backbone.pipeline import TextToImagePipeline
from safeio import atomic_write_json
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fp32", required=True, help="model folder with fp32 weights")
    p.add_argument("--fp16", required=True, help="the same model shipped with fp16 weights")
    p.add_argument("--limit-per-task", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default="runs/check_fp16.json")
    args = p.parse_args()
    prompts = [e["prompt"] for e in limit_per_task(read_metadata(PACKAGE_METADATA["heldout"]), args.limit_per_task)]
    seeds = list(range(len(prompts)))
    imgs = {}
    for name, folder in (("fp32", args.fp32), ("fp16", args.fp16)):
        pipe = TextToImagePipeline(load_backbone(folder))
        imgs[name] = pipe(prompts, seeds=seeds, steps=args.steps).images.astype(np.float64)
    diff = np.abs(imgs["fp32"] - imgs["fp16"])
    report = {
        "prompts": len(prompts),
        "steps": args.steps,
        "pixel_abs_diff_mean": float(diff.mean()),
        "pixel_abs_diff_max": float(diff.max()),
        "pixels_differing_by_more_than_8": float((diff > 8).mean()),
    }
    print(json.dumps(report, indent=2))
    atomic_write_json(args.out, report)
