"""Mine plan-revision rows on training-family prompts and train the toy reviser with TRL SFT (issue 13's LLM plan
revision).

Rows are (request, plan) pairs, the request being `planner.reviser.revision_request(prompt, draft, critique)`:

- drafts: the writer's greedy plan, a plan sampled from the writer (``--temperature``), and a corruption of the
  prompt's plan of the kinds the writer gets wrong on unfamiliar wordings (two objects' positions swapped, the
  relation's axis turned, one object's color changed, one object doubled, one of two objects dropped);
- critique: each draft is drawn by the shipped chain on the image's seed and read by the shipped critic, and the
  critique compares that reading with the draft (what the refine loop sees when it asks for a revision);
- target: the prompt's plan (the toy data set's, as in planner SFT) when the draft says something else; the
  draft itself when it says the same (a right plan whose image failed is the U-Net's fault: the loop answers it
  with another move).

``--balance`` adds, for every wrong draft, a row where that same draft is the right answer: a prompt said from
the draft itself (the toy grammar's frames), the same critique (the chain draws from the plan's caption, so the
image, and its reading, depend on the plan alone), answered by the draft. Without it, a draft's pattern (a
stacked layout, two of one shape) tells the reviser that the draft is wrong without reading the prompt (measured:
docs/results.md).

``--replay N`` adds N rows of the writer's own widened-grammar training data (`toyworld.data.wide_rows`, the
writer's seed) as drafts that are right and match their image: without them, LoRA training on training-family
wordings alone wears away what the widened-grammar adapter taught (measured: the reviser turned "dimly lit" back
into normal light).

The ShapesEval detector is never used. Training is `alignment.planner_sft.train_planner` (TRL ``SFTTrainer``,
loss on the plan only) on the writer (shipped planner + widened-grammar adapter, merged), as a LoRA adapter.

    python scripts/train_reviser.py --out runs/reviser              # mine (resumable rows.jsonl), then train
    python scripts/train_reviser.py --out runs/reviser --ship       # ... and copy the adapter to the package
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alignment.planner_sft import PlannerTrainConfig, train_planner
from diffusion_backbone.models import load_backbone
from llm_bridge.bridge import LLMBridge
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.critic import PlanReader, critique
from planner.planner import Planner
from planner.reviser import revision_request
from planner.schema import Plan, PlanError
from safeio import atomic_write_text
from toyworld import vocab as V
from toyworld.data import wide_rows
from toyworld.eval.metadata import read_metadata
from toyworld.eval.runner import PACKAGE_METADATA, image_seed
from toyworld.grammar import caption_draw, plan_caption, reading_order_plan, render_prompt
from toyworld.pretrained import pretrained_path
from toyworld.scene import SceneSpec

TURN = {"left": "top", "right": "bottom", "top": "left", "bottom": "right"}


def corrupt(plan: Plan, rng: np.random.Generator) -> Plan | None:
    """A plan that says something else than ``plan``, in one of the ways the writer errs; None if no corruption
    applies or the result cannot be drawn."""
    spec = SceneSpec.from_plan(plan)
    objs = list(spec.objects)
    kinds = ["color"]
    if len(objs) == 2 and all(o.count == 1 for o in objs):
        kinds += ["swap", "turn", "drop"]
    if len(objs) == 1 and objs[0].count == 1:
        kinds += ["double"]
    kind = kinds[rng.integers(len(kinds))]
    if kind == "color":
        i = int(rng.integers(len(objs)))
        others = sorted(set(V.COLORS) - {objs[i].color})
        objs[i] = dataclasses.replace(objs[i], color=others[rng.integers(len(others))])
    elif kind == "swap":
        objs = [dataclasses.replace(objs[0], positions=objs[1].positions),
                dataclasses.replace(objs[1], positions=objs[0].positions)]  # fmt: skip
    elif kind == "turn":
        objs = [dataclasses.replace(o, positions=tuple(TURN.get(p, p) for p in o.positions)) for o in objs]
    elif kind == "drop":
        keep = objs[int(rng.integers(2))]
        objs = [dataclasses.replace(keep, positions=("center",))]
    elif kind == "double":
        objs = [dataclasses.replace(objs[0], count=2, positions=("left", "right"))]
    try:
        return dataclasses.replace(spec, objects=tuple(objs)).to_plan()
    except (ValueError, PlanError):
        return None


def load_chain():
    spec = V.TOY_PLAN_SPEC
    reader = Planner.from_pretrained(pretrained_path("planner"), spec=spec)
    writer = Planner.from_pretrained(pretrained_path("planner"), spec=spec, adapter=pretrained_path("planner_wide"))
    pipe = Plan2ImgPipeline(reader, LLMBridge.from_pretrained(pretrained_path("bridge")),
                            load_backbone(pretrained_path("base")), writer=writer, caption=plan_caption,
                            normalize_plan=reading_order_plan)  # fmt: skip
    critic = PlanReader.from_pretrained(pretrained_path("critic"), spec=spec)
    return pipe, critic


def drafts_for(pipe, entries, rng, temperature: float, gen: torch.Generator) -> list[list[Plan]]:
    """Per entry: the writer's greedy plan, one sampled plan and one corruption of the entry's plan (each only if
    it parses)."""
    prompts = [e["prompt"] for e in entries]
    greedy = pipe.writer.plan(prompts)
    sampled = pipe.writer.plan(prompts, do_sample=True, temperature=temperature, generator=gen)
    out = []
    for e, g, s in zip(entries, greedy, sampled):
        gold = Plan.parse(e["plan"], V.TOY_PLAN_SPEC)
        out.append([p for p in (g.plan, s.plan, corrupt(gold, rng)) if p is not None])
    return out


def mine(args, rows_path: Path) -> list[dict]:
    """Rows for every training-family prompt (``--limit`` of them), written as JSON lines; a finished file is
    reused."""
    if rows_path.is_file():
        return [json.loads(line) for line in rows_path.read_text().splitlines()]
    entries = read_metadata(PACKAGE_METADATA["train"])
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(entries))[: args.limit]
    entries = [entries[i] for i in sorted(order)]
    pipe, critic = load_chain()
    grammar = V.TOY_PLAN_SPEC.object_grammar
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for start in tqdm(range(0, len(entries), args.batch_size), desc="mining revision rows"):
        batch = entries[start : start + args.batch_size]
        drafts = drafts_for(pipe, batch, rng, args.temperature, gen)
        jobs = [(b, d) for b, ds in enumerate(drafts) for d in ds]
        prompts = [batch[b]["prompt"] for b, _ in jobs]
        seeds = [image_seed(args.seed, start + b, 0) for b, _ in jobs]
        images = pipe(prompts, seeds, plans=[d.to_text() for _, d in jobs], sampler="dpm++2m", steps=25,
                      guidance_scale=7.5, batch_size=len(jobs)).images  # fmt: skip
        for (b, draft), reading in zip(jobs, critic.read(images)):
            gold = Plan.parse(batch[b]["plan"], V.TOY_PLAN_SPEC)
            same = critique(gold, draft, grammar).ok  # the draft says what the prompt's plan says
            crit = critique(draft, reading.plan, grammar)
            rows.append({
                "prompt": batch[b]["prompt"],
                "draft": draft.to_text(),
                "critique": crit.text,
                "image_ok": crit.ok,
                "draft_right": same,
                "target": draft.to_text() if same else gold.to_text(),
            })  # fmt: skip
    atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def balance(rows: list[dict], seed: int) -> list[dict]:
    """For every wrong draft, a row whose prompt is said from the draft (so the draft is right) and whose target is
    the draft itself."""
    rng = np.random.default_rng(seed)
    extra = []
    for r in rows:
        if r["draft_right"]:
            continue
        try:
            draw, family = caption_draw(Plan.parse(r["draft"], V.TOY_PLAN_SPEC))
        except (PlanError, ValueError):
            continue
        prompt = render_prompt(draw, family, rng)
        extra.append({**r, "prompt": prompt, "draft_right": True, "target": r["draft"], "balanced": True})
    return rows + extra


def merged_writer(out: Path) -> Path:
    """The writer (shipped planner + widened-grammar adapter) merged and saved: the reviser's starting point."""
    path = out / "writer"
    if not (path / "config.json").is_file():
        writer = Planner.from_pretrained(pretrained_path("planner"), spec=V.TOY_PLAN_SPEC,
                                         adapter=pretrained_path("planner_wide"))  # fmt: skip
        writer.save_pretrained(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/reviser")
    p.add_argument("--limit", type=int, default=800, help="training-family prompts to mine (of 800)")
    p.add_argument("--temperature", type=float, default=1.2, help="of the sampled draft")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per mining batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--balance", action="store_true", help="add a right-answer row for every wrong draft")
    p.add_argument("--replay", type=int, default=0, help="rows of the writer's widened-grammar data, kept as they are")
    p.add_argument("--replay-seed", type=int, default=1, help="the seed the writer's widened-grammar rows used")
    p.add_argument("--ship", action="store_true", help="copy the adapter to toyworld/pretrained/reviser")
    args = p.parse_args()
    out = Path(args.out)
    rows = mine(args, out / "rows.jsonl")
    if args.balance:
        rows = balance(rows, args.seed)
    wrong = sum(not r["draft_right"] for r in rows)
    print(f"{len(rows)} rows: {wrong} drafts that say something else than the prompt's plan, "
          f"{sum(r['draft_right'] and not r['image_ok'] for r in rows)} right drafts whose image failed")  # fmt: skip
    cfg = PlannerTrainConfig(data=None, out=str(out / "sft"), init=str(merged_writer(out)), epochs=args.epochs,
                             lr=args.lr, batch_size=32, lora_rank=args.rank, seed=args.seed, save_steps=100,
                             logging_steps=10)  # fmt: skip
    extra = [(revision_request(r["prompt"], r["draft"], r["critique"]), r["target"]) for r in rows]
    replay = wide_rows(args.replay, args.replay_seed)
    extra += [(revision_request(prompt, plan, None), plan) for prompt, plan in replay]
    adapter = train_planner(cfg, extra_rows=extra)
    print(f"reviser adapter: {adapter}")
    if args.ship:
        dest = pretrained_path("planner_wide").parent / "reviser"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(adapter, dest)
        print(f"shipped to {dest}")


if __name__ == "__main__":
    main()
