"""Critique-and-refine: generate, let the critic read the image as a plan, compare with the intended plan, change
the generation where it failed, and keep the best image by critic score.

Round 0 is a normal generation. Each later round starts from the best image so far and applies one move:

- ``local``: SDEdit inside the regions of the objects the critique names (their plan regions, and where the
  critic's reading puts an extra or misplaced object, widened by one latent pixel), with fresh noise, keeping
  every other latent as it was (blended diffusion; SLD's add / delete / move as region edits); strength
  ``local_strength``, cost that fraction of a generation;
- ``sdedit``: SDEdit of the whole image at ``sdedit_strength`` with fresh noise (keeps the composition, redraws
  details); used when the findings name no placed object;
- ``reseed``: a fresh generation with the next seed (cost 1); used when a scene-wide field (style, lighting,
  camera) is wrong (edits that keep the composition keep those too: measured, docs/results.md), when the moves
  above are not allowed, or when they have failed ``patience`` times in a row.

Compute is counted in diffusion calls (a partial SDEdit counts as its fraction of the steps); the loop stops when
the critic finds nothing wrong, or when the next move would exceed ``budget`` (default ``rounds``). The same seed
gives the same trajectory.
"""

from __future__ import annotations

import io
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.pipeline import seeded_generators
from diffusion_backbone.sampling import decode_latents, encode_images, sample
from llm_bridge.layout import plan_region_masks
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.critic import CriticError, Critique, PlanReader, critique
from planner.schema import Plan
from safeio import InputError, atomic_write_bytes, atomic_write_json

MOVES = ("local", "sdedit", "reseed")
SEED_STRIDE = 100  # candidate j of an image with seed s uses seed s + 100 j (refine and best-of-K alike)


@dataclass
class RefineConfig:
    rounds: int = 4  # at most this many rounds
    budget: float | None = None  # diffusion calls allowed (None: ``rounds``)
    moves: tuple[str, ...] = MOVES  # allowed moves (the ablation: ("reseed",) is best-of-N picked by the critic)
    local_strength: float = 0.8
    sdedit_strength: float = 0.5
    patience: int = 2  # failed edits in a row before a reseed
    clear_found: bool = True  # local edits also redraw where the reading puts extra or misplaced objects
    scene_reseed: bool = True  # a wrong style / lighting / camera is fixed by a reseed, not by an edit
    seed_stride: int = SEED_STRIDE  # the j-th new seed of a trajectory is ``seed + j * seed_stride`` (best-of-K's)
    sampler: str = "dpm++2m"
    steps: int = 25
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        unknown = [m for m in self.moves if m not in MOVES]
        if unknown or not self.moves:
            raise InputError(f"unknown or no refine moves {list(self.moves)}; known: {list(MOVES)}")
        if self.rounds < 1:
            raise InputError(f"rounds must be >= 1, got {self.rounds}")


@dataclass
class Round:
    index: int
    move: str  # "generate" for round 0
    seed: int
    cost: float  # diffusion calls spent by this round
    image: np.ndarray  # (H, W, 3) uint8
    critique: Critique | None
    timings: dict[str, float] = field(default_factory=dict)
    note: str | None = None  # e.g. why the critic's reading was replaced by a reseed

    @property
    def score(self) -> float:
        return 0.0 if self.critique is None else self.critique.score

    @property
    def critique_ok(self) -> bool:
        """The critic read the image and found nothing wrong."""
        return self.critique is not None and self.critique.ok


@dataclass
class Trajectory:
    prompt: str
    plan: str  # the intended plan (the writer's)
    rounds: list[Round]

    @property
    def best(self) -> Round:
        """The round with the highest critic score (the earliest of equals)."""
        return max(self.rounds, key=lambda r: (r.score, -r.index))

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.rounds)

    def prefix(self, rounds: int, budget: float | None = None) -> Trajectory:
        """The trajectory a run with fewer ``rounds`` (and diffusion calls ``budget``, default ``rounds``) would
        have made from the same prompt, plan and seed: the loop's choices never depend on its limits, so that run
        is this one cut where the smaller limits stop it (how refine@2 is read off a refine@4 run)."""
        budget = rounds if budget is None else budget
        kept, spent = [], 0.0
        for r in self.rounds:
            if len(kept) >= rounds or spent + r.cost > budget + 1e-9:
                break
            kept.append(r)
            spent += r.cost
        return Trajectory(self.prompt, self.plan, kept)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "plan": self.plan,
            "best_round": self.best.index,
            "diffusion_calls": self.cost,
            "rounds": [
                {
                    "round": r.index,
                    "move": r.move,
                    "seed": r.seed,
                    "diffusion_calls": r.cost,
                    "score": r.score,
                    "critique": None if r.critique is None else r.critique.to_dict(),
                    "timings": r.timings,
                    "note": r.note,
                }
                for r in self.rounds
            ],
        }

    def strip(self, scale: int = 4) -> np.ndarray:
        """A PNG-ready strip: each round's image scaled up, with its move, score and critique under it."""
        return render_strip(self, scale)

    def save(self, path: str | Path, scale: int = 4) -> tuple[Path, Path]:
        """``path`` (the strip PNG) and ``path`` with ``.json`` (plans, critiques, scores, seeds, timings)."""
        path = Path(path)
        buf = _png_bytes(self.strip(scale))
        atomic_write_bytes(path, buf)
        atomic_write_json(path.with_suffix(".json"), self.to_dict())
        return path, path.with_suffix(".json")


class Refiner:
    """Runs the loop for a `Plan2ImgPipeline` with a `PlanReader` critic."""

    def __init__(self, pipe: Plan2ImgPipeline, critic: PlanReader, config: RefineConfig | None = None):
        self.pipe, self.critic = pipe, critic
        self.config = config or RefineConfig()
        self.grammar = pipe.planner.plan_spec.object_grammar

    @torch.no_grad()
    def __call__(self, prompt: str, seed: int = 0, plan: str | None = None) -> Trajectory:
        return self.run_batch([prompt], [seed], None if plan is None else [plan])[0]

    @torch.no_grad()
    def run_batch(self, prompts: list[str], seeds: list[int], plans: list[str] | None = None) -> list[Trajectory]:
        """One trajectory per prompt, run in lockstep: each round batches the trajectories that make the same
        move. Each trajectory's choices depend only on its own rounds, so it is the one a batch of one makes (up
        to the float rounding of batched kernels). Timings are each image's share of its batch's time."""
        cfg = self.config
        budget = cfg.rounds if cfg.budget is None else cfg.budget
        if len(seeds) != len(prompts) or (plans is not None and len(plans) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts, {len(seeds)} seeds and {len(plans or prompts)} plans")
        intended = [Plan.parse(p, self.pipe.planner.plan_spec) for p in (plans or self._write_plans(prompts))]
        plans = [p.to_text() for p in intended]
        n = len(prompts)
        t0 = time.perf_counter()
        cond, null = self.pipe.conditioning_for(prompts, plans)
        t1 = time.perf_counter()
        trajs = [Trajectory(prompt, plan, []) for prompt, plan in zip(prompts, plans)]
        latents = self._generate(cond, null, list(seeds))
        share = {"conditioning": (t1 - t0) / n, "generate": (time.perf_counter() - t1) / n}
        self._add(trajs, list(range(n)), "generate", list(seeds), 1.0, latents, intended, share)
        state = _BatchState(latents.clone(), [0] * n, [s + cfg.seed_stride for s in seeds], [False] * n)
        while groups := self._next_moves(trajs, state, budget):
            for move, idx in groups.items():
                before = [trajs[i].best.score for i in idx]
                seeds_now = [state.next_seed[i] for i in idx]
                t0 = time.perf_counter()
                new = self._move(move, _rows(cond, idx), _rows(null, idx), state.best_latents[idx],
                                 [trajs[i].best for i in idx], [plans[i] for i in idx], seeds_now)  # fmt: skip
                share = {"generate": (time.perf_counter() - t0) / len(idx)}
                self._add(trajs, idx, move, seeds_now, self._cost(move), new, intended, share)
                state.record(idx, move, new, before, [trajs[i].rounds[-1].score for i in idx], cfg.seed_stride)
        return trajs

    def _next_moves(self, trajs: list[Trajectory], state: _BatchState, budget: float) -> dict[str, list[int]]:
        """The trajectories that go on, grouped by their next move; a trajectory stops when its critic is
        satisfied, its rounds are spent, or its next move does not fit the budget (then for good)."""
        groups: dict[str, list[int]] = {}
        for i, traj in enumerate(trajs):
            if state.stopped[i] or len(traj.rounds) >= self.config.rounds or traj.best.critique_ok:
                continue
            move = self._choose(traj.best, state.fails[i])
            if traj.cost + self._cost(move) > budget + 1e-9:
                state.stopped[i] = True
                continue
            groups.setdefault(move, []).append(i)
        return groups

    def _write_plans(self, prompts: list[str]) -> list[str]:
        out = []
        for prompt, result in zip(prompts, self.pipe.writer.plan(prompts)):
            if result.plan is None:
                raise InputError(f"the planner produced no valid plan for {prompt!r}: {result.error}")
            out.append(result.plan.to_text())
        return out

    # ------------------------------------------------------------------------------------------ moves
    def _cost(self, move: str) -> float:
        cfg = self.config
        return {"local": cfg.local_strength, "sdedit": cfg.sdedit_strength, "reseed": 1.0}[move]

    def _choose(self, best: Round, fails: int) -> str:
        cfg = self.config
        allowed = [m for m in MOVES if m in cfg.moves]
        if (fails >= cfg.patience or best.critique is None) and "reseed" in allowed:
            return "reseed"  # edits keep failing, or the critic could not read the image: nothing to edit by
        if cfg.scene_reseed and "reseed" in allowed and any(f.object is None and f.kind != "extra"
                                                             for f in best.critique.findings):  # fmt: skip
            return "reseed"  # style / lighting / camera are global: an edit that keeps the composition keeps them
        if best.critique is not None and best.critique.failing_objects() and "local" in allowed:
            return "local"
        if "sdedit" in allowed:
            return "sdedit"
        return allowed[-1] if "reseed" in allowed else allowed[0]

    def _generate(self, cond, null, seeds: list[int], **kwargs) -> torch.Tensor:
        cfg = self.config
        unet = self.pipe.backbone.unet
        return sample(unet, self.pipe.backbone.scheduler(cfg.sampler), cond, null, num_inference_steps=cfg.steps,
                      guidance_scale=cfg.guidance_scale, generator=seeded_generators(seeds), progress=False,
                      **kwargs)  # fmt: skip

    def _move(self, move: str, cond, null, best_latents, best: list[Round], plans: list[str],
              seeds: list[int]) -> torch.Tensor:  # fmt: skip
        """One move for a group of trajectories; ``best_latents`` (G, C, h, w) are the latents of their best."""
        cfg = self.config
        if move == "reseed":
            return self._generate(cond, null, seeds)
        if move == "sdedit":
            return self._generate(cond, null, seeds, init_latents=best_latents, strength=cfg.sdedit_strength)
        size = best_latents.shape[-2:]
        keeps = [self._keep_mask(plan, r.critique, size) for plan, r in zip(plans, best)]
        # no region to keep: edit the whole image (a keep mask of zeros blends nothing in)
        keep = torch.cat([torch.zeros(1, 1, *size) if k is None else k for k in keeps]).to(best_latents)
        return self._generate(cond, null, seeds, init_latents=best_latents, strength=cfg.local_strength,
                              keep_mask=keep)  # fmt: skip

    def _keep_mask(self, plan: str, crit: Critique, size) -> torch.Tensor | None:
        """(1, 1, h, w): 1 where a local edit keeps the latents, 0 where it redraws: the intended regions of the
        failing objects and, with ``clear_found``, where the reading puts what should not be there (an extra
        object, a misplaced object's found positions: SLD's delete-and-move), each widened by one latent pixel.
        None when none of that has a region."""
        size = tuple(size)
        parts = []
        intended = plan_region_masks(plan, size, self.pipe.grid)
        if intended is not None:
            parts += [intended[i] for i in crit.failing_objects() if i < len(intended)]
        if self.config.clear_found:
            parts += self._found_regions(crit, size)
        parts = [m for m in parts if m.amax() > 0]
        if not parts:
            return None
        edit = torch.stack(parts).amax(0)[None, None]  # (1, 1, h, w)
        edit = F.max_pool2d((edit > 0).float(), 3, stride=1, padding=1)  # one latent pixel of margin
        return 1.0 - edit

    def _found_regions(self, crit: Critique, size: tuple[int, int]) -> list[torch.Tensor]:
        grid = self.pipe.grid
        read = None
        out = []
        for f in crit.findings:
            if f.kind == "extra" and f.object is not None:
                read = plan_region_masks(crit.reading, size, grid) if read is None else read
                if read is not None and f.object < len(read):
                    out.append(read[f.object])
            elif f.kind == "position" and f.found:
                out += [grid.box_mask(grid.centers[n], size) for n in f.found.split(", ") if n in grid.centers]
        return out

    # ------------------------------------------------------------------------------------------ critic
    def _add(self, trajs: list[Trajectory], idx: list[int], move: str, seeds: list[int], cost: float, latents,
             intended: list[Plan], timings: dict[str, float]) -> None:  # fmt: skip
        """Decode a group's latents, let the critic read them, and append a round to each of its trajectories."""
        t0 = time.perf_counter()
        images = decode_latents(self.pipe.backbone.vae, latents)
        t1 = time.perf_counter()
        readings = self._read(images)
        t2 = time.perf_counter()
        share = {**timings, "decode": (t1 - t0) / len(idx), "critic": (t2 - t1) / len(idx)}
        for j, i in enumerate(idx):
            reading, note = readings[j]
            crit = None if reading is None else critique(intended[i], reading, self.grammar)
            traj = trajs[i]
            traj.rounds.append(Round(len(traj.rounds), move, seeds[j], cost, images[j], crit, dict(share), note))

    def _read(self, images: np.ndarray) -> list[tuple[Plan | None, str | None]]:
        """The critic's reading of each image; where it fails, the images are read one by one, and an image it
        cannot read gets no reading (its round scores 0) and a note saying why."""
        try:
            return [(r.plan, None) for r in self.critic.read(images)]
        except CriticError as err:
            if len(images) == 1:
                return [(None, f"critic failed: {err}")]
        return [self._read(images[j : j + 1])[0] for j in range(len(images))]


@dataclass
class _BatchState:
    """Per trajectory of a batch: the latents of its best round, failed edits in a row, its next seed, done."""

    best_latents: torch.Tensor  # (B, C, h, w)
    fails: list[int]
    next_seed: list[int]
    stopped: list[bool]

    def record(self, idx: list[int], move: str, latents, before: list[float], after: list[float], stride: int):
        for j, i in enumerate(idx):
            self.next_seed[i] += stride
            if after[j] > before[j]:
                self.best_latents[i], self.fails[i] = latents[j], 0
            else:
                self.fails[i] = self.fails[i] + 1 if move != "reseed" else 0


def _rows(cond, idx: list[int]):
    """Rows ``idx`` of a batch's conditioning (or of a timestep-aware one); a batch-1 null broadcasts as it is."""
    if cond is None:
        return None
    if callable(cond) and not isinstance(cond, Conditioning):
        return lambda t, cond=cond: cond(t).index(idx)
    if cond.batch_size == 1:
        return cond
    return cond.index(idx)


@dataclass
class BestOf:
    """Best-of-K for a batch: per image the candidates' images (K, H, W, 3), their critiques and the pick."""

    candidates: list[np.ndarray]
    critiques: list[list[Critique | None]]
    picks: list[int]

    @property
    def images(self) -> np.ndarray:
        return np.stack([c[p] for c, p in zip(self.candidates, self.picks)])

    def picks_within(self, k: int) -> list[int]:
        """The critic's pick among the first ``k`` candidates of each image: best-of-k read off a best-of-K run
        (the candidates' seeds do not depend on K)."""
        return [_argmax_score(row[:k]) for row in self.critiques]


def best_of(generate, critic: PlanReader, prompts: list[str], plans: list[str], seeds: list[int], k: int,
            grammar=None, pick=None, stride: int = SEED_STRIDE) -> BestOf:  # fmt: skip
    """K candidates per image (seeds ``s + j * stride``, j < K; candidate 0 is the single-shot image), read by the
    critic and compared with the image's plan; the pick is the best critic score (the earliest of equals), or
    ``pick(candidates, entry_index) -> int`` when given (e.g. an oracle judge, reported as an upper bound only).
    ``generate(prompts, seeds) -> (B, H, W, 3) uint8``."""
    if not 1 <= k <= 9:
        raise ValueError(f"best-of K needs 1 <= K <= 9, got {k}")
    n = len(prompts)
    images = np.asarray(generate([p for p in prompts for _ in range(k)], [s + j * stride for s in seeds
                                                                          for j in range(k)]))  # fmt: skip
    candidates = [images[i * k : (i + 1) * k] for i in range(n)]
    critiques: list[list[Critique | None]] = []
    for i in range(n):
        intended = Plan.parse(plans[i])
        row = []
        try:
            readings = critic.read(candidates[i]) if k > 1 or pick is None else []
            row = [critique(intended, r.plan, grammar) for r in readings]
        except CriticError:
            row = [None] * k  # unreadable: fall back to the first candidate
        critiques.append(row)
    if pick is not None:
        picks = [int(pick(candidates[i], i)) for i in range(n)]
    else:
        picks = [_argmax_score(row) for row in critiques]
    return BestOf(candidates, critiques, picks)


def _argmax_score(row: list[Critique | None]) -> int:
    scores = [-1.0 if c is None else c.score for c in row]
    return int(np.argmax(scores)) if scores else 0


def reencode(pipe: Plan2ImgPipeline, image: np.ndarray) -> torch.Tensor:
    """Latents of an image (for editing an image that was not generated in this session)."""
    return encode_images(pipe.backbone.vae, image[None])


# ---------------------------------------------------------------------------------------------- the strip
def render_strip(traj: Trajectory, scale: int = 4, width_chars: int = 34) -> np.ndarray:
    """Each round's image scaled by ``scale`` (nearest), captioned with its move, seed, score and critique."""
    tiles = []
    for r in traj.rounds:
        img = Image.fromarray(r.image).resize((r.image.shape[1] * scale, r.image.shape[0] * scale), Image.NEAREST)
        head = f"round {r.index}: {r.move} (seed {r.seed})" + ("  BEST" if r.index == traj.best.index else "")
        body = r.note or ("" if r.critique is None else r.critique.text)
        lines = [head, f"score {r.score:.2f}"] + textwrap.wrap(body, width_chars)
        tiles.append((img, lines))
    line_h = 12
    text_h = line_h * max(len(lines) for _, lines in tiles) + 8
    w = sum(img.width for img, _ in tiles) + 8 * (len(tiles) + 1)
    h = max(img.height for img, _ in tiles) + text_h + 16 + 2 * line_h
    canvas = Image.new("RGB", (max(w, 6 * len(traj.prompt) + 16), h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 4), f"prompt: {traj.prompt}", fill="black")
    x = 8
    for img, lines in tiles:
        canvas.paste(img, (x, 8 + 2 * line_h))
        for k, line in enumerate(lines):
            draw.text((x, 12 + 2 * line_h + img.height + k * line_h), line, fill="black")
        x += img.width + 8
    return np.asarray(canvas)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
