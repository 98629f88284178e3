"""A captioned picture grid of generated samples (native and/or bridge) for docs/.

python scripts/sample_grid.py --pipelines native bridge --out docs/samples.png
"""

import argparse
import io

import numpy as np

from diffusion_backbone.models import load_backbone
from diffusion_backbone.pipeline import TextToImagePipeline
from llm_bridge.bridge import LLMBridge
from llm_bridge.native_layout import NativeLayoutPipeline
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.planner import Planner
from safeio import atomic_write_bytes
from toyworld.data import preview_grid
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA, ground_truth_generator
from toyworld.grammar import plan_caption, reading_order_plan
from toyworld.pretrained import pretrained_path
from toyworld.vocab import TOY_PLAN_SPEC

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--pipelines", nargs="+", default=["native"], choices=["truth", "native", "native-layout", "bridge"]
    )
    p.add_argument("--per-task", type=int, default=1, help="prompts per ShapesEval task (held-out families)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--out", default="docs/samples.png")
    args = p.parse_args()
    entries = limit_per_task(read_metadata(PACKAGE_METADATA["heldout"]), args.per_task)
    prompts = [e["prompt"] for e in entries]
    seeds = [args.seed + i for i in range(len(entries))]
    rows = {}
    if "truth" in args.pipelines:
        rows["truth"] = ground_truth_generator()(prompts, entries, seeds)
    if "native" in args.pipelines:
        pipe = TextToImagePipeline(load_backbone(pretrained_path("base")))
        rows["native"] = pipe(prompts, seeds, sampler=args.sampler, guidance_scale=args.guidance).images
    # the shipped chain as `plan2img generate` runs it: the widened-grammar adapter writes, the plan is read
    writer = Planner.from_pretrained(
        pretrained_path("planner"), adapter=pretrained_path("planner_wide"), spec=TOY_PLAN_SPEC
    )
    if "native-layout" in args.pipelines:
        pipe = NativeLayoutPipeline(writer, load_backbone(pretrained_path("base")), caption=plan_caption)
        rows["native+layout"] = pipe(prompts, seeds, sampler=args.sampler, guidance_scale=args.guidance).images
    if "bridge" in args.pipelines:
        pipe = Plan2ImgPipeline(
            Planner.from_pretrained(pretrained_path("planner"), spec=TOY_PLAN_SPEC),
            LLMBridge.from_pretrained(pretrained_path("bridge")),
            load_backbone(pretrained_path("base")),
            writer=writer,
            caption=plan_caption,
            normalize_plan=reading_order_plan,
        )
        rows["bridge"] = pipe(prompts, seeds, sampler=args.sampler, guidance_scale=args.guidance).images
    images, captions = [], []
    for i, e in enumerate(entries):
        for name, imgs in rows.items():
            images.append(imgs[i])
            captions.append(f"[{name}] {e['tag']}: {e['prompt']}")
    grid = preview_grid(images, captions, columns=len(rows) * 2)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out} ({len(entries)} prompts x {list(rows)}) {np.asarray(images).shape}")
