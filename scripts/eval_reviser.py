"""Does the plan reviser fix the writer's plans? Plan-level check on ShapesEval prompts, no images.

For each prompt (``--split``, ``--limit-per-task`` per task) the writer's greedy plan is compared with the prompt's
plan (the metadata's, used only to score): a plan is *right* when it says the same (`planner.critic.critique`
finds nothing, object order aside). The reviser then reads (prompt, writer's plan, ``--critique``) and its plan is
scored the same way. Prints per task: right writer plans, right revised plans, plans the reviser fixed and plans
it broke; writes JSON.

    python scripts/eval_reviser.py --reviser runs/reviser/sft/final/adapter --out runs/eval/reviser_plans.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from planner.critic import says_the_same
from planner.planner import Planner
from planner.reviser import MATCHES, PlanReviser
from planner.schema import Plan
from safeio import atomic_write_json
from toyworld import vocab as V
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA
from toyworld.pretrained import pretrained_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reviser", required=True, help="a reviser LoRA adapter over the shipped writer")
    p.add_argument("--split", choices=sorted(PACKAGE_METADATA), default="heldout")
    p.add_argument("--limit-per-task", type=int, default=20)
    p.add_argument("--critique", default=MATCHES, help="the critique text the reviser reads")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    entries = limit_per_task(read_metadata(PACKAGE_METADATA[args.split]), args.limit_per_task)
    spec, wide = V.TOY_PLAN_SPEC, pretrained_path("planner_wide")
    writer = Planner.from_pretrained(pretrained_path("planner"), spec=spec, adapter=wide)
    reviser = PlanReviser.from_pretrained(pretrained_path("planner"), spec=spec, adapter=[wide, args.reviser])
    prompts = [e["prompt"] for e in entries]
    drafts = [r.plan for r in writer.plan(prompts)]
    keep = [i for i, d in enumerate(drafts) if d is not None]
    revised = [None] * len(entries)
    for i, r in zip(keep, reviser.revise([prompts[i] for i in keep], [drafts[i] for i in keep],
                                         [args.critique] * len(keep))):  # fmt: skip
        revised[i] = r.plan
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    examples = []
    for e, d, r in zip(entries, drafts, revised):
        gold = Plan.parse(e["plan"], spec)
        a, b = says_the_same(gold, d, V.OBJECT_GRAMMAR), says_the_same(gold, r, V.OBJECT_GRAMMAR)
        for key in (e["tag"], "overall"):
            c = counts[key]
            c["n"] += 1
            c["writer_right"] += a
            c["revised_right"] += b
            c["fixed"] += b and not a
            c["broken"] += a and not b
        if a != b and len(examples) < 12:
            examples.append({"prompt": e["prompt"], "writer": d and d.to_text(), "revised": r and r.to_text()})
    print(f"{'task':<14} {'n':>4} {'writer right':>13} {'revised right':>14} {'fixed':>6} {'broken':>7}")
    for task, c in sorted(counts.items(), key=lambda kv: kv[0] == "overall"):
        print(f"{task:<14} {c['n']:>4} {c['writer_right']:>13} {c['revised_right']:>14} {c['fixed']:>6} "
              f"{c['broken']:>7}")  # fmt: skip
    atomic_write_json(args.out, {"split": args.split, "critique": args.critique, "counts": counts,
                                 "examples": examples})  # fmt: skip


if __name__ == "__main__":
    main()
