"""Per-prompt win rate of a tuned chain against the chain before tuning, judged twice: by the ShapesEval detector
(each image correct or not, from the runs' ``results.jsonl``) and, separately, by the critic (its score of each saved
image against the shipped writer's plan of the prompt: the same intended plan for both runs). A prompt is won when
its mean over samples is higher after tuning, lost when lower; the win rate is wins / (wins + losses), ties counted
apart. A critic win rate that rises while the detector's does not is reward hacking: the tuned model learned the
critic, not the task.

Both runs must be `plan2img eval --save-images` folders over the same prompts and seeds:

    python scripts/dpo_winrate.py --before runs/eval14/chain --after runs/eval14/unet_lora --out FILE.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from planner.critic import PlanReader, critique
from planner.planner import load_planner
from safeio import atomic_write_json
from toyworld import vocab as V
from toyworld.eval.runner import read_folder
from toyworld.pretrained import pretrained_path


def detector_scores(run: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = defaultdict(list)
    for line in (run / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["prompt_index"]].append(float(r["correct"]))
    return out


def critic_scores(folder: tuple[list, np.ndarray], prompts: dict[int, str], intended: dict[str, object], critic,
                  grammar) -> dict:  # fmt: skip
    """The critic's score of each image of ``folder`` (`read_folder`'s items and images) against its intended plan."""
    items, images = folder
    readings = critic.read(images)
    out: dict[int, list[float]] = defaultdict(list)
    for (i, _, _), reading in zip(items, readings):
        out[i].append(critique(intended[prompts[i]], reading.plan, grammar).score if reading.plan else 0.0)
    return out


def image_shift(was: dict, now: dict, before: np.ndarray, after: np.ndarray) -> dict:
    """How far tuning moved the images: mean absolute pixel change (0-255) over paired images (``before`` and
    ``after``, `read_folder`'s arrays), its 90th percentile, and how many detector verdicts flipped (``was`` and
    ``now``, `detector_scores`). A tuned chain that flips no verdict moved too little to be judged; one whose
    pixels moved far and whose verdicts flip both ways drifted."""
    if before.shape != after.shape:
        raise SystemExit(f"the two runs saved different images: {before.shape} against {after.shape}")
    flips = sum(a != b for i in was for a, b in zip(was[i], now[i], strict=True))
    shifts = np.abs(before.astype(np.float32) - after.astype(np.float32)).mean(axis=(1, 2, 3))
    return {"mean_abs_pixel_change": float(shifts.mean()), "p90_abs_pixel_change": float(np.percentile(shifts, 90)),
            "verdict_flips": int(flips), "images": len(shifts)}  # fmt: skip


def win_rate(before: dict[int, list[float]], after: dict[int, list[float]], tags: dict[int, str]) -> dict:
    if set(before) != set(after):
        raise SystemExit("the two runs score different prompts: run both on the same --limit-per-task / seeds")
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # wins, ties, losses
    for i in before:
        d = np.mean(after[i]) - np.mean(before[i])
        col = 0 if d > 1e-9 else 2 if d < -1e-9 else 1
        rows[tags[i]][col] += 1
        rows["overall"][col] += 1
    return {
        tag: {"wins": w, "ties": t, "losses": lo, "win_rate": w / (w + lo) if w + lo else float("nan")}
        for tag, (w, t, lo) in rows.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="eval folder of the chain before tuning (with images/)")
    p.add_argument("--after", required=True, nargs="+", help="eval folders of tuned chains (with images/)")
    p.add_argument("--critic", default=None, help="critic folder (default: the shipped one)")
    p.add_argument("--out", required=True, help="JSON file written")
    args = p.parse_args()
    before = Path(args.before)
    rows = [json.loads(x) for x in (before / "results.jsonl").read_text().splitlines()]
    prompts = {r["prompt_index"]: r["prompt"] for r in rows}
    tags = {r["prompt_index"]: r["tag"] for r in rows}
    spec = V.TOY_PLAN_SPEC
    writer = load_planner(pretrained_path("planner_wide"), base=pretrained_path("planner"), spec=spec)
    unique = sorted(set(prompts.values()))
    intended = {q: r.plan for q, r in zip(unique, writer.plan(unique))}
    critic = PlanReader.from_pretrained(args.critic or pretrained_path("critic"), spec=spec)
    grammar = spec.object_grammar
    n = max(prompts) + 1
    folder_before, det_before = read_folder(before / "images", n), detector_scores(before)
    crit_before = critic_scores(folder_before, prompts, intended, critic, grammar)
    report = {"before": str(before), "prompts": len(prompts), "runs": {}}
    print("| run | detector win rate (W/T/L) | critic win rate (W/T/L) | mean abs pixel change | verdict flips |")
    print("|---|---|---|---|---|")
    for run in map(Path, args.after):
        folder, det_run = read_folder(run / "images", n), detector_scores(run)
        det = win_rate(det_before, det_run, tags)
        cri = win_rate(crit_before, critic_scores(folder, prompts, intended, critic, grammar), tags)
        shift = image_shift(det_before, det_run, folder_before[1], folder[1])
        report["runs"][str(run)] = {"detector": det, "critic": cri, "shift": shift}
        d, c = det["overall"], cri["overall"]
        print(f"| {run.name} | {d['win_rate']:.2f} ({d['wins']}/{d['ties']}/{d['losses']}) "
              f"| {c['win_rate']:.2f} ({c['wins']}/{c['ties']}/{c['losses']}) "
              f"| {shift['mean_abs_pixel_change']:.2f} | {shift['verdict_flips']} |")  # fmt: skip
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
