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


def _load_base(model: str | None):
    from diffusion_backbone.models import load_backbone
    from toyworld.pretrained import pretrained_path

    return load_backbone(model or pretrained_path("base"))


def _save_images(images, out: str) -> None:
    import io

    import numpy as np
    from PIL import Image

    from safeio import atomic_write_bytes

    grid = images[0] if len(images) == 1 else np.concatenate(list(images), axis=1)  # side by side
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    t0 = time.perf_counter()
    from toyworld.grammar import check_prompt

    prompt = check_prompt(args.prompt)
    seeds = [args.seed + k for k in range(args.n)]
    if not args.native:
        raise SystemExit("error: only --native generation is available so far")
    from diffusion_backbone.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline(_load_base(args.model))
    out = pipe(
        [prompt] * args.n, seeds, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance, progress=True
    )
    _save_images(out.images, args.output)
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in out.timings.items())
    print(f"wrote {args.output} ({args.n} image(s), {timings}; {time.perf_counter() - t0:.2f}s since start)")
    return 0


def _native_generator(args: argparse.Namespace):
    from diffusion_backbone.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline(_load_base(args.model))

    def generate(prompts, batch, seeds):
        return pipe(
            prompts,
            seeds,
            sampler=args.sampler,
            steps=args.steps,
            guidance_scale=args.guidance,
            batch_size=len(prompts),
        ).images

    return generate


def _vae_round_trip(args: argparse.Namespace):
    from diffusion_backbone.sampling import decode_latents, encode_images

    vae = _load_base(args.model).vae

    def transform(images):
        return decode_latents(vae, encode_images(vae, images))

    return transform


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
    if sum([bool(args.images), args.ground_truth, bool(args.generate)]) != 1:
        raise SystemExit("error: pass exactly one of --images DIR, --ground-truth, --generate native")
    extra = {"metadata": str(metadata)}
    if args.images:
        results = score_folder(entries, args.images)
        title = f"ShapesEval: {args.images}"
    else:
        if args.ground_truth:
            if args.degrade == "vae":
                generate = ground_truth_generator("none", transform=_vae_round_trip(args))
            else:
                generate = ground_truth_generator(args.degrade)
            title = f"ShapesEval ground truth (degrade={args.degrade}, {metadata.name})"
        else:
            generate = _native_generator(args)
            title = f"ShapesEval {args.generate} ({args.sampler}, {args.steps} steps, guidance {args.guidance})"
            extra.update(sampler=args.sampler, steps=args.steps, guidance=args.guidance, generator=args.generate)
        results, images = score_generator(
            entries,
            generate,
            n_per_prompt=args.n_per_prompt,
            seed=args.seed,
            batch_size=args.batch_size,
            keep_images=args.save_images,
        )
    summary = write_report(args.out, entries, results, title, images=images, extra=extra)
    from toyworld.eval.scoring import summary_table

    print(summary_table(summary, title))
    print(f"wrote {args.out}/results.jsonl, summary.json, summary.md")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=["ddim", "euler-a", "dpm++2m"], default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")


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
        "--degrade",
        choices=["none", "blur-noise", "vae"],
        default="none",
        help="degradation of ground-truth renders (vae: a round trip through the base model's VAE)",
    )
    ev.add_argument("--generate", choices=["native"], default=None, help="generate the images with this pipeline")
    ev.add_argument("--model", default=None, help="base model folder (default: the shipped toy base)")
    _add_sampling_args(ev)
    ev.add_argument("--batch-size", type=int, default=32, help="images per generation batch")
    ev.add_argument("--n-per-prompt", type=int, default=4, help="images per prompt when generating")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--limit-per-task", type=int, default=None, help="use only the first N prompts of each task")
    ev.add_argument("--save-images", action="store_true", help="also write generated images to OUT/images")
    ev.add_argument("--out", required=True, help="output folder for results.jsonl and summary.json")
    ev.set_defaults(func=_cmd_eval)

    gen = sub.add_parser("generate", help="prompt -> image")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG (several images side by side)")
    gen.add_argument("--native", action="store_true", help="native baseline: CLIP text -> frozen U-Net")
    gen.add_argument("--model", default=None, help="base model folder (default: the shipped toy base)")
    gen.add_argument("--n", type=int, default=1, help="images (seeds seed .. seed + n - 1)")
    gen.add_argument("--seed", type=int, default=0)
    _add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
