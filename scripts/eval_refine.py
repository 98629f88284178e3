"""Critique-and-refine against best-of-N at equal compute, on held-out ShapesEval (issue 13's table).

Every row scores the same prompts (held-out families; ``--split train`` for mining pairs) with the same seeds as
`plan2img eval` (`image_seed`), and each is written as a `plan2img eval` run folder (summary.json +
results.jsonl), so `scripts/results_table.py` gives the table with paired differences. Shared work is done once:

- per system (``bridge``, ``native``): K candidates per image (seeds ``s + 100 j``, as `plan2img eval --best-of`),
  read by the critic; rows ``single`` (candidate 0), ``best-of-k`` for every k <= K (the critic's pick among the
  first k, `BestOf.picks_within`) and ``best-of-K-oracle`` (the detector picks: an upper bound, never a result);
- ``refine@k`` for each k of ``--refine``: one loop per image at the largest k (batches of trajectories in
  lockstep, `Refiner.run_batch`), the smaller k read off it with `Trajectory.prefix` (the loop's choices do not
  depend on its limits; both are tested to equal their own runs); ``--moves`` restricts the loop's moves and
  ``--no-clear-found`` makes local edits redraw only the intended regions, ``--no-scene-reseed`` answers a wrong
  style / lighting / camera with an edit instead of a reseed (the ablations).

Also written: ``latency.json`` (per-round seconds: conditioning, generation, decode, critic; per trajectory),
``moves.json`` (how often each move ran, and how often it raised the critic's score), and critic-ranked preference
pairs under ``pairs/`` (Pick-a-Pic and TRL columns). The detector only scores: it never picks, except in the
labelled oracle row.

    python scripts/eval_refine.py --limit-per-task 20 --n-per-prompt 1 --best-of 4 --refine 2 4 --out runs/eval/refine
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alignment.dpo import load_unet_dpo
from alignment.preference import PairWriter
from diffusion_backbone.models import load_backbone
from diffusion_backbone.pipeline import TextToImagePipeline
from llm_bridge.bridge import LLMBridge
from llm_bridge.pipeline import Plan2ImgPipeline
from llm_bridge.refine import RefineConfig, Refiner, best_of
from planner.critic import PlanReader, critique
from planner.planner import Planner, load_planner
from planner.reviser import PlanReviser, reviser_stack
from safeio import atomic_write_json
from toyworld import vocab as V
from toyworld.eval.metadata import limit_per_task, read_metadata
from toyworld.eval.runner import PACKAGE_METADATA, image_seed, judge_candidates, score_image, write_report
from toyworld.grammar import plan_caption, reading_order_plan
from toyworld.pretrained import pretrained_path


def load_models(args):
    spec = V.TOY_PLAN_SPEC
    reader = Planner.from_pretrained(pretrained_path("planner"), spec=spec)
    wide = pretrained_path("planner_wide")
    # a planner folder (e.g. planner DPO's final/writer) or an adapter over the shipped planner
    writer = load_planner(args.writer or wide, base=pretrained_path("planner"), spec=spec)
    backbone = load_backbone(pretrained_path("base"))
    if args.unet_dpo:
        load_unet_dpo(backbone.unet, args.unet_dpo)
    bridge = LLMBridge.from_pretrained(args.bridge or pretrained_path("bridge"))
    pipe = Plan2ImgPipeline(reader, bridge, backbone, writer=writer, caption=plan_caption,
                            normalize_plan=reading_order_plan)  # fmt: skip
    critic = PlanReader.from_pretrained(args.critic or pretrained_path("critic"), spec=spec)
    native = TextToImagePipeline(load_backbone(pretrained_path("base")))  # its own U-Net: the bridge patches pipe's
    reviser = None
    if args.reviser:  # a LoRA adapter trained on the writer (scripts/train_reviser.py), merged over it
        base, adapters = reviser_stack(args.writer or wide, args.reviser, pretrained_path("planner"))
        reviser = PlanReviser.from_pretrained(base, spec=spec, adapter=adapters)
    return pipe, native, critic, reviser


def jobs_of(entries: list[dict], n: int, per_batch: int):
    jobs = [(i, k) for i in range(len(entries)) for k in range(n)]
    for start in range(0, len(jobs), per_batch):
        yield jobs[start : start + per_batch]


def candidate_rows(system: str, generate, pipe, critic, entries, args, pairs: PairWriter) -> dict[str, list[dict]]:
    """Rows single / best-of-k / best-of-K-oracle of one system, from one set of K candidates per image."""
    K, rows = args.best_of, {}
    names = {k: f"{system} single" if k == 1 else f"{system} best-of-{k}" for k in range(1, K + 1)}
    bar = tqdm(total=len(entries) * args.n_per_prompt, desc=f"{system}: {K} candidates per image")
    for jobs in jobs_of(entries, args.n_per_prompt, max(1, args.batch_size // K)):
        batch = [entries[i] for i, _ in jobs]
        prompts = [e["prompt"] for e in batch]
        plans = [r.plan.to_text() for r in pipe.writer.plan(prompts)]  # the intended plans the critic compares with
        by_prompt = dict(zip(prompts, batch))

        def gen(ps, ss, by_prompt=by_prompt):
            return generate(ps, [by_prompt[p] for p in ps], ss)

        seeds = [image_seed(args.seed, i, k) for i, k in jobs]
        res = best_of(gen, critic, prompts, plans, seeds, K, pipe.writer.plan_spec.object_grammar)
        for k in range(1, K + 1):
            for (i, s), cands, pick in zip(jobs, res.candidates, res.picks_within(k)):
                rows.setdefault(names[k], []).append(score_image(entries[i], i, s, cands[pick]))
        for (i, s), cands in zip(jobs, res.candidates):
            oracle = judge_candidates(entries[i], cands)
            rows.setdefault(f"{system} best-of-{K}-oracle", []).append(score_image(entries[i], i, s, cands[oracle]))
        for prompt, cands, crits in zip(prompts, res.candidates, res.critiques):
            if crits and all(c is not None for c in crits):
                pairs.add_ranked(prompt, cands, [c.score for c in crits])
        bar.update(len(jobs))
    bar.close()
    return rows


def refine_rows(pipe, critic, reviser, entries, args, pairs: PairWriter) -> tuple[dict[str, list[dict]], list]:
    """Rows refine@k for each k of ``--refine``: one loop at the largest k, the smaller ones as its prefixes."""
    top = max(args.refine)
    config = RefineConfig(rounds=top, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance,
                          revise_reference=args.revise_reference,
                          clear_found=not args.no_clear_found, scene_reseed=not args.no_scene_reseed,
                          **({"moves": tuple(args.moves.split(","))} if args.moves else {}))  # fmt: skip
    refiner = Refiner(pipe, critic, config, reviser=reviser)
    tag = " ".join(filter(None, [args.moves, f"reviser, {args.revise_reference} reference" if reviser else "",
                                 "no-clear-found" if args.no_clear_found else "",
                                 "no-scene-reseed" if args.no_scene_reseed else ""]))  # fmt: skip
    tag = f" ({tag})" if tag else ""
    rows: dict[str, list[dict]] = {f"bridge refine@{k}{tag}": [] for k in sorted(args.refine)}
    trajectories = []
    jobs = [(i, s) for i in range(len(entries)) for s in range(args.n_per_prompt)]
    per_batch = max(1, args.batch_size // 2)
    bar = tqdm(total=len(jobs), desc=f"refine@{top}{tag}")
    for start in range(0, len(jobs), per_batch):
        chunk = jobs[start : start + per_batch]
        prompts = [entries[i]["prompt"] for i, _ in chunk]
        plans = [r.plan.to_text() for r in pipe.writer.plan(prompts)]
        t0 = time.perf_counter()
        trajs = refiner.run_batch(prompts, [image_seed(args.seed, i, s) for i, s in chunk], plans)
        sec = (time.perf_counter() - t0) / len(chunk)  # each trajectory's share of the batch's time
        for (i, s), traj in zip(chunk, trajs):
            trajectories.append((traj, sec))
            for k in sorted(args.refine):
                rows[f"bridge refine@{k}{tag}"].append(score_image(entries[i], i, s, traj.prefix(k).best.image))
            pairs.add_ranked(traj.prompt, [r.image for r in traj.rounds], [r.score for r in traj.rounds])
            if plan_pair := traj.plan_pair():
                pairs.add_plans(traj.prompt, *plan_pair)
        bar.update(len(chunk))
    bar.close()
    return rows, trajectories


def plan_pairs(pipe, critic, entries, args, pairs: PairWriter) -> int:
    """Plan pairs for planner DPO: ``--plan-samples`` plans sampled from the writer per image
    (``--plan-temperature``), one image each on the image's seed, each read by the critic against the writer's
    greedy plan (what the prompt asks for); the plan whose image the critic scores best is chosen, the worst
    rejected (no pair on a tie). A plan that drops or changes what the greedy plan draws loses; among faithful plans,
    the one the U-Net renders best wins. Returns the number of pairs."""
    K, grammar, before = args.plan_samples, pipe.writer.plan_spec.object_grammar, len(pairs.plan_rows)
    gen = torch.Generator().manual_seed(args.seed)
    jobs = [(i, s) for i in range(len(entries)) for s in range(args.n_per_prompt)]
    per_batch = max(1, args.batch_size // K)
    for start in tqdm(range(0, len(jobs), per_batch), desc=f"plan pairs: {K} sampled plans per image"):
        chunk = jobs[start : start + per_batch]
        prompts = [entries[i]["prompt"] for i, _ in chunk]
        greedy = [r.plan for r in pipe.writer.plan(prompts)]
        sampled = [r.plan for r in pipe.writer.plan([p for p in prompts for _ in range(K)], do_sample=True,
                                                    temperature=args.plan_temperature, generator=gen)]  # fmt: skip
        keep = [j for j, plan in enumerate(sampled) if plan is not None]
        plans = [sampled[j].to_text() for j in keep]
        seeds = [image_seed(args.seed, *chunk[j // K]) for j in keep]
        images = pipe([prompts[j // K] for j in keep], seeds, plans=plans, sampler=args.sampler, steps=args.steps,
                      guidance_scale=args.guidance, batch_size=len(keep)).images  # fmt: skip
        readings = critic.read(images)
        scores: dict[int, list[tuple[float, str]]] = {}
        for j, plan, reading in zip(keep, plans, readings):
            if reading.plan is None or greedy[j // K] is None:  # unreadable, or no intended plan to compare with
                continue
            score = critique(greedy[j // K], reading.plan, grammar).score
            scores.setdefault(j // K, []).append((score, plan))
        for b, ranked in scores.items():
            (hi, best), (lo, worst) = max(ranked), min(ranked)
            if hi > lo:
                pairs.add_plans(prompts[b], best, worst)
    return len(pairs.plan_rows) - before


def latency_and_moves(trajectories) -> tuple[dict, dict]:
    per_round: dict[str, dict[str, list[float]]] = {}
    moves, improved = Counter(), Counter()
    for traj, _ in trajectories:
        best = -1.0
        for r in traj.rounds:
            for key, sec in r.timings.items():
                per_round.setdefault(r.move, {}).setdefault(key, []).append(sec)
            moves[r.move] += 1
            improved[r.move] += r.score > best and r.index > 0
            best = max(best, r.score)
    latency = {
        move: {key: float(np.mean(v)) for key, v in keys.items()} | {"rounds": len(next(iter(keys.values())))}
        for move, keys in per_round.items()
    }
    latency["trajectory_seconds_mean"] = float(np.mean([sec for _, sec in trajectories]))
    latency["rounds_mean"] = float(np.mean([len(t.rounds) for t, _ in trajectories]))
    latency["diffusion_calls_mean"] = float(np.mean([t.cost for t, _ in trajectories]))
    latency["stopped_satisfied"] = float(np.mean([t.best.critique_ok for t, _ in trajectories]))
    return latency, {m: {"ran": moves[m], "raised_best_score": improved[m]} for m in moves}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="one run folder per row is written under here")
    p.add_argument("--split", choices=sorted(PACKAGE_METADATA), default="heldout",
                   help="prompt families (train: mine DPO pairs without touching held-out ones)")  # fmt: skip
    p.add_argument("--metadata", default=None,
                   help="a metadata JSONL (`plan2img metadata --split train --wide`) instead of --split")  # fmt: skip
    p.add_argument("--limit-per-task", type=int, default=20)
    p.add_argument("--tasks", nargs="+", default=None, help="only these ShapesEval tasks (e.g. mine pairs for style)")
    p.add_argument("--n-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--best-of", type=int, default=4, help="K candidates per image (0: no best-of rows)")
    p.add_argument("--refine", type=int, nargs="*", default=[2, 4], help="refine@k rows (none: skip the loop)")
    p.add_argument(
        "--plan-samples",
        type=int,
        default=0,
        help="mine plan pairs: K plans sampled from the writer per image, ranked by the critic",
    )
    p.add_argument(
        "--plan-temperature",
        type=float,
        default=1.2,
        help="temperature of --plan-samples (the toy writer is peaked: at 1.0 its samples rarely differ)",
    )
    p.add_argument(
        "--all-pairs",
        action="store_true",
        help="every differently scored pair of a candidate set, not only its best against its worst",
    )
    p.add_argument("--moves", default=None, help="refine moves, comma-separated (default: all)")
    p.add_argument("--no-clear-found", action="store_true", help="local edits redraw only the intended regions")
    p.add_argument("--no-scene-reseed", action="store_true", help="scene-field findings get edits, not a reseed")
    p.add_argument("--systems", nargs="+", default=["bridge", "native"], choices=["bridge", "native"])
    p.add_argument("--bridge", default=None)
    p.add_argument("--critic", default=None)
    p.add_argument("--reviser", default=None, help="a reviser LoRA adapter over the writer (enables the revise move)")
    p.add_argument("--revise-reference", choices=["original", "revised"], default="original",
                   help="what rounds are scored against after a revision (RefineConfig.revise_reference)")  # fmt: skip
    p.add_argument("--writer", default=None, help="a planner folder that writes the plans (default: the shipped one)")
    p.add_argument("--unet-dpo", default=None, help="a DPO run's final/ folder: its U-Net LoRA, merged")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=32, help="images per generation batch")
    args = p.parse_args()
    out = Path(args.out)
    metadata = Path(args.metadata) if args.metadata else PACKAGE_METADATA[args.split]
    entries = limit_per_task(read_metadata(metadata), args.limit_per_task)
    if args.tasks:
        unknown = sorted(set(args.tasks) - {e["tag"] for e in entries})
        if unknown:
            p.error(f"--tasks: no prompts of task(s) {unknown} in {metadata.name}")
        entries = [e for e in entries if e["tag"] in args.tasks]
    pipe, native, critic, reviser = load_models(args)
    sampling = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)
    generators = {"bridge": pipe.as_generator(**sampling), "native": native.as_generator(**sampling)}
    pairs, rows = PairWriter(all_pairs=args.all_pairs), {}
    suffix = "_".join(filter(None, [args.moves, f"reviser_{args.revise_reference}" if args.reviser else "",
                                    "no_clear_found" if args.no_clear_found else "",
                                    "no_scene_reseed" if args.no_scene_reseed else ""]))  # fmt: skip
    suffix = "_" + suffix.replace(",", "_") if suffix else ""  # of this run's refine files
    if args.best_of:
        for system in args.systems:
            rows |= candidate_rows(system, generators[system], pipe, critic, entries, args, pairs)
    if args.refine:
        refine, trajectories = refine_rows(pipe, critic, reviser, entries, args, pairs)
        rows |= refine
        latency, moves = latency_and_moves(trajectories)
        atomic_write_json(out / f"latency{suffix}.json", latency)
        atomic_write_json(out / f"moves{suffix}.json", moves)
        print(json.dumps({"latency": latency, "moves": moves}, indent=2))
    if args.plan_samples:
        print(f"plan pairs: {plan_pairs(pipe, critic, entries, args, pairs)}")
    for name, results in rows.items():
        folder = out / re.sub(r"[^A-Za-z0-9.-]+", "_", name.replace("@", "_at_")).strip("_")
        write_report(folder, entries, results, f"ShapesEval {name}", extra={"row": name, **sampling})
        print(f"{name}: {np.mean([r['correct'] for r in results]):.3f} (image accuracy) -> {folder}")
    if pairs.image_rows or pairs.plan_rows:
        what = (["best-of"] if args.best_of else []) + ([f"refine{suffix}"] if args.refine else [])
        what += ["plan-samples"] if args.plan_samples else []
        pairs.save(out / "pairs" / "_".join(what))


if __name__ == "__main__":
    main()
