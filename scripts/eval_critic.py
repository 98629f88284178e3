"""How well the critic reads images: on ground-truth renders (exact plan) and on generated images (agreement with
the ShapesEval detector, which here only *measures* the critic and never feeds it).

For each image the critic's critique and a critique built from the detector's reading (objects grouped by shape
and colour, each placed in the 3x3 region of its centre) are compared on the object fields both can see
(missing / extra object, count, color, position). Reported per field: agreement, and the precision and recall of
the critic's "this field is wrong" against the detector's.

    python scripts/eval_critic.py --critic runs/critic/final --limit-per-task 20 --out runs/critic_eval.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from diffusion_backbone.models import load_backbone
from llm_bridge.bridge import LLMBridge
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.critic import PlanReader, critique
from planner.planner import Planner
from planner.schema import Plan, PlanObject
from safeio import atomic_write_json
from toyworld import vocab as V
from toyworld.eval.detector import detect
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA, ground_truth_generator
from toyworld.grammar import plan_caption, reading_order_plan
from toyworld.pretrained import pretrained_path

KINDS = ("missing", "extra", "count", "color", "position")


def objects_only(plan: Plan) -> Plan:
    """The plan's objects without size and material (what the detector reading can be compared on)."""
    objs = [dataclasses.replace(o, size=None, material=None) for o in plan.structured_objects(V.OBJECT_GRAMMAR)]
    return Plan.from_objects(objs)


def detector_plan(image: np.ndarray) -> Plan:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for o in detect(image).objects:
        groups[(o.shape, o.color)].append(V.region_of(*o.center))
    objs = [PlanObject(name=s, count=min(len(p), 4), color=c, positions=tuple(p[:4])) for (s, c), p in groups.items()]
    return Plan.from_objects(objs or [PlanObject(name="circle", count=1)])


def wrong_set(intended: Plan, reading: Plan) -> set[tuple[int | None, str]]:
    c = critique(objects_only(intended), objects_only(reading), V.OBJECT_GRAMMAR)
    return {(f.object if f.kind != "extra" else None, f.kind) for f in c.findings if f.kind in KINDS}


def field_stats(intended: list[Plan], critic: list[Plan], judge: list[Plan]) -> dict:
    tp, fp, fn, agree, total = Counter(), Counter(), Counter(), Counter(), Counter()
    for want, crit, det in zip(intended, critic, judge):
        cw, dw = wrong_set(want, crit), wrong_set(want, det)
        n_obj = len(want.objects)
        for kind in KINDS:
            keys = [(None, kind)] if kind == "extra" else [(i, kind) for i in range(n_obj)]
            for key in keys:
                c, d = key in cw, key in dw
                total[kind] += 1
                agree[kind] += c == d
                tp[kind] += c and d
                fp[kind] += c and not d
                fn[kind] += d and not c
    out = {}
    for kind in KINDS:
        prec = tp[kind] / (tp[kind] + fp[kind]) if tp[kind] + fp[kind] else None
        rec = tp[kind] / (tp[kind] + fn[kind]) if tp[kind] + fn[kind] else None
        out[kind] = {"agreement": agree[kind] / max(total[kind], 1), "precision_wrong": prec, "recall_wrong": rec,
                     "detector_wrong": tp[kind] + fn[kind], "checks": total[kind]}  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--critic", default=None)
    p.add_argument("--limit-per-task", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    critic = PlanReader.from_pretrained(args.critic or pretrained_path("critic"), spec=V.TOY_PLAN_SPEC)
    entries = limit_per_task(read_metadata(PACKAGE_METADATA["heldout"]), args.limit_per_task)
    prompts = [e["prompt"] for e in entries]
    seeds = [1_000 * i for i in range(len(entries))]
    # renders: the critic against the scene's own plan
    renders = ground_truth_generator("none")(prompts, entries, seeds)
    gt = [Plan.parse(e["plan"]) for e in entries]
    read_r = [r.plan for r in critic.read(renders)]
    exact = float(np.mean([objects_only(a) == objects_only(b) for a, b in zip(gt, read_r)]))
    # generated: the shipped chain
    planner = Planner.from_pretrained(pretrained_path("planner"), spec=V.TOY_PLAN_SPEC)
    writer = Planner.from_pretrained(pretrained_path("planner"), spec=V.TOY_PLAN_SPEC,
                                     adapter=pretrained_path("planner_wide"))  # fmt: skip
    pipe = Plan2ImgPipeline(planner, LLMBridge.from_pretrained(pretrained_path("bridge")),
                            load_backbone(pretrained_path("base")),
                            writer=writer, caption=plan_caption, normalize_plan=reading_order_plan)  # fmt: skip
    out = pipe(prompts, seeds, sampler="dpm++2m", steps=args.steps, guidance_scale=7.5, batch_size=40)
    intended = [Plan.parse(t) for t in out.plan_texts]
    read_g = [r.plan for r in critic.read(out.images)]
    judged = [detector_plan(img) for img in out.images]
    report = {
        "n_images": len(entries),
        "renders": {"objects_exact": exact, "fields": field_stats(gt, read_r, [detector_plan(x) for x in renders])},
        "generated": {"fields": field_stats(intended, read_g, judged)},
    }
    atomic_write_json(Path(args.out), report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
