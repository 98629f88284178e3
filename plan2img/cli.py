"""The `plan2img` command line: argument parsing only; every command calls a library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_data_build(args: argparse.Namespace) -> int:
    from toyworld.data import build_dataset

    stats = build_dataset(
        args.out, n=args.n, seed=args.seed, workers=args.workers, heldout_fraction=args.heldout_fraction
    )
    print(json.dumps(stats, indent=2))
    print(f"wrote data set of {args.n} examples to {args.out}")
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from toyworld.data import preview

    path = preview(args.out, data=args.data, n=args.n, seed=args.seed, columns=args.columns)
    print(f"wrote {path}")
    return 0


def _cmd_metadata(args: argparse.Namespace) -> int:
    from toyworld.eval.metadata import make_metadata, write_metadata

    entries = make_metadata(split=args.split, seed=args.seed)
    path = write_metadata(entries, args.out)
    print(f"wrote {len(entries)} prompts to {path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from toyworld.eval.metadata import read_metadata
    from toyworld.eval.runner import (
        PACKAGE_METADATA,
        ground_truth_generator,
        score_folder,
        score_generator,
        write_report,
    )

    metadata = Path(args.metadata) if args.metadata else PACKAGE_METADATA[args.split]
    entries = read_metadata(metadata)
    if args.limit_per_task:
        counts: dict[str, int] = {}
        kept = []
        for e in entries:
            counts[e["tag"]] = counts.get(e["tag"], 0) + 1
            if counts[e["tag"]] <= args.limit_per_task:
                kept.append(e)
        entries = kept
    images = None
    if args.images:
        if args.ground_truth:
            raise SystemExit("error: pass either --images or --ground-truth, not both")
        results = score_folder(entries, args.images)
        title = f"ShapesEval: {args.images}"
    elif args.ground_truth:
        generate = ground_truth_generator(args.degrade)
        results, images = score_generator(
            entries, generate, n_per_prompt=args.n_per_prompt, seed=args.seed, keep_images=args.save_images
        )
        title = f"ShapesEval ground truth (degrade={args.degrade}, {metadata.name})"
    else:
        raise SystemExit("error: pass --images DIR or --ground-truth")
    summary = write_report(args.out, entries, results, title, images=images, extra={"metadata": str(metadata)})
    from toyworld.eval.scoring import summary_table

    print(summary_table(summary, title))
    print(f"wrote {args.out}/results.jsonl, summary.json, summary.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plan2img", description="LLM-planned image generation (toy world built in).")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build or preview toy-world data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="render a data set to disk (Hugging Face datasets format)")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--n", type=int, default=50_000, help="number of examples")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    build.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="share of rows worded by held-out template families"
    )
    build.set_defaults(func=_cmd_data_build)
    prev = data_sub.add_parser("preview", help="write a captioned grid of examples")
    prev.add_argument("--out", required=True, help="output PNG")
    prev.add_argument("--data", default=None, help="data set folder (default: sample fresh examples)")
    prev.add_argument("--n", type=int, default=16)
    prev.add_argument("--seed", type=int, default=0)
    prev.add_argument("--columns", type=int, default=4)
    prev.set_defaults(func=_cmd_data_preview)

    meta = sub.add_parser("metadata", help="write ShapesEval evaluation_metadata.jsonl")
    meta.add_argument("--out", required=True)
    meta.add_argument(
        "--split",
        choices=["heldout", "train"],
        default="heldout",
        help="template families the prompts are worded with",
    )
    meta.add_argument("--seed", type=int, default=0)
    meta.set_defaults(func=_cmd_metadata)

    ev = sub.add_parser("eval", help="score images with ShapesEval")
    ev.add_argument("--metadata", default=None, help="metadata JSONL (default: the shipped file of --split)")
    ev.add_argument(
        "--split",
        choices=["heldout", "train"],
        default="heldout",
        help="which shipped metadata to use when --metadata is not given",
    )
    ev.add_argument("--images", default=None, help="GenEval-layout folder DIR/<index>/samples/<k>.png")
    ev.add_argument("--ground-truth", action="store_true", help="render and score the metadata's own scenes")
    ev.add_argument(
        "--degrade", choices=["none", "blur-noise"], default="none", help="degradation of ground-truth renders"
    )
    ev.add_argument("--n-per-prompt", type=int, default=4, help="images per prompt when generating")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--limit-per-task", type=int, default=None, help="use only the first N prompts of each task")
    ev.add_argument("--save-images", action="store_true", help="also write generated images to OUT/images")
    ev.add_argument("--out", required=True, help="output folder for results.jsonl and summary.json")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
