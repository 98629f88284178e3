"""Plan pairs for planner DPO from fresh rows of the widened *training* grammar (prompt and the plan the world drew
it from). ``--source self-play`` (default): the writer's greedy and sampled plans of each row, and every plan that
says something else becomes a rejected plan against the row's own plan (`alignment.preference.self_play_plan_pairs`).
``--source contrast``: minimal pairs, the row's plan against copies with the objects mirrored, moved to the other
two-slot arrangement, or a COLOR field that repeats one color (`alignment.preference.contrast_plan_pairs`; no
planner runs); ``--contrasts ... extra shape`` adds one-object rows against an unasked second object or another
shape. Held-out sentence frames never appear; the ShapesEval detector plays no part. Writes ``OUT/plans``
(TRL's ``prompt`` / ``chosen`` / ``rejected``) and ``OUT/report.json``. Example:

    python scripts/mine_plan_pairs.py --rows 3000 --seed 11 --samples 2 --out runs/plan_pairs_sp
    python scripts/mine_plan_pairs.py --source contrast --rows 3000 --seed 13 --out runs/plan_pairs_ct
    python scripts/train_planner_dpo.py --pairs runs/plan_pairs_sp/plans --adapter toyworld/pretrained/planner_wide \\
        --out runs/planner_sp --max-steps 300
"""

import argparse
import json
from pathlib import Path

import torch

from alignment.preference import CONTRASTS, DEFAULT_CONTRASTS, contrast_plan_pairs, self_play_plan_pairs
from planner.critic import says_the_same
from planner.planner import Planner
from safeio import atomic_write_json
from toyworld import vocab as V
from toyworld.data import wide_rows
from toyworld.pretrained import pretrained_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("self-play", "contrast"), default="self-play")
    p.add_argument(
        "--contrasts", nargs="+", choices=CONTRASTS, default=list(DEFAULT_CONTRASTS), help="--source contrast: kinds"
    )
    p.add_argument("--rows", type=int, default=3000, help="fresh training-grammar rows")
    p.add_argument("--seed", type=int, default=11, help="row seed (the shipped writer was trained on seed 1's rows)")
    p.add_argument("--samples", type=int, default=2, help="sampled plans per row, besides the greedy one")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-augment", action="store_true", help="rows without chatter/typo noise")
    p.add_argument("--planner", default=str(pretrained_path("planner")))
    p.add_argument("--adapter", default=str(pretrained_path("planner_wide")), help="'' for none")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.rows < 1:
        p.error(f"--rows must be >= 1, got {args.rows}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = wide_rows(args.rows, args.seed, augment=not args.no_augment)
    if args.source == "contrast":
        pairs, report = contrast_plan_pairs(rows, V.TOY_PLAN_SPEC, args.contrasts)
    else:
        pairs, report = _self_play(args, rows)
    pairs.save(Path(args.out))
    report = {**report, "config": vars(args)}
    atomic_write_json(Path(args.out) / "report.json", report)
    print(json.dumps(report, indent=2))


def _self_play(args, rows):
    writer = Planner.from_pretrained(args.planner, spec=V.TOY_PLAN_SPEC, adapter=args.adapter or None)
    return self_play_plan_pairs(
        writer, rows, lambda want, got: says_the_same(want, got, V.OBJECT_GRAMMAR), samples=args.samples,
        temperature=args.temperature, seed=args.seed, spec=V.TOY_PLAN_SPEC, batch_size=args.batch_size,
    )  # fmt: skip


if __name__ == "__main__":
    main()
