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
  above are not allowed, or when they have failed ``patience`` times in a row;
- ``revise`` (with a `PlanReviser`): at a trajectory's first failed critique the planner LLM reads the prompt, the
  plan and the critique and writes a revised plan; if it says something else, a fresh generation from it with the
  next seed (cost 1), and the trajectory draws from the revised plan from then on; if it says the same, the other
  moves go on. With ``revise_reference="original"`` (default) every round is still scored against the intended
  plan, so the revision is a generation control; with ``"revised"`` the revised plan also becomes what the critic
  scores against (measured: the LLM then wins by asking for less, docs/results.md);
- ``emphasis``: the failing objects' conditioning tokens (their plan-grounded regions' tokens) scaled by
  ``emphasis_weight`` and the best round's seed generated again (cost 1): prompt weighting per object, as
  ``(red star:1.5)`` in AUTOMATIC1111; tried once per trajectory, before the local edits.

Compute is counted in diffusion calls (a partial SDEdit counts as its fraction of the steps); the loop stops when
the critic finds nothing wrong, or when the next move would exceed ``budget`` (default ``rounds``). The same seed
gives the same trajectory.
"""

from __future__ import annotations

import dataclasses
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
from planner.reviser import PlanReviser, draft_text
from planner.schema import ObjectGrammar, Plan, PlanError
from safeio import InputError, atomic_write_bytes, atomic_write_json

MOVES = ("local", "sdedit", "reseed", "revise", "emphasis")
DEFAULT_MOVES = ("local", "sdedit", "reseed", "revise")
SEED_STRIDE = 100  # candidate j of an image with seed s uses seed s + 100 j (refine and best-of-K alike)


@dataclass
class RefineConfig:
    rounds: int = 4  # at most this many rounds
    budget: float | None = None  # diffusion calls allowed (None: ``rounds``)
    # allowed moves (the ablation: ("reseed",) is best-of-N picked by the critic); ``revise`` runs only when the
    # `Refiner` has a reviser; ``emphasis`` (plan-grounded regions only) is opt-in: it measured 0.5 points below
    # the loop without it (docs/results.md)
    moves: tuple[str, ...] = DEFAULT_MOVES
    local_strength: float = 0.8
    sdedit_strength: float = 0.5
    patience: int = 2  # failed edits in a row before a reseed
    emphasis_weight: float = 1.5  # scale of a failing object's conditioning tokens (``emphasis``)
    revise_reference: str = "original"  # what rounds are scored against after a revision: "original" | "revised"
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
        if self.revise_reference not in ("original", "revised"):
            raise InputError(f"revise_reference must be 'original' or 'revised', got {self.revise_reference!r}")
        if not self.emphasis_weight > 0:
            raise InputError(f"emphasis_weight must be > 0, got {self.emphasis_weight}")


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
    plan: str | None = None  # the plan this round was critiqued against (None: the trajectory's)
    drawn: str | None = None  # the plan it was drawn from, when a revision made that another one

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
    grammar: ObjectGrammar | None = None  # how critiques compare objects (for re-scoring after a revision)

    @property
    def current_plan(self) -> str:
        """The plan the trajectory now aims at: the last round's (a ``revise`` round changes it)."""
        return (self.rounds[-1].plan if self.rounds else None) or self.plan

    @property
    def drawn_plan(self) -> str:
        """The plan the trajectory now draws from (after a revision scored against the original plan, the revised
        one)."""
        last = self.rounds[-1] if self.rounds else None
        return (last.drawn if last is not None and last.drawn else None) or self.current_plan

    def critique_of(self, r: Round) -> Critique | None:
        """``r``'s critique against the current plan (its own when it was drawn from that plan; else its reading
        compared again)."""
        plan = self.current_plan
        if r.critique is None or (r.plan or self.plan) == plan:
            return r.critique
        return critique(Plan.parse(plan), r.critique.reading, self.grammar)

    def score_of(self, r: Round) -> float:
        crit = self.critique_of(r)
        return 0.0 if crit is None else crit.score

    @property
    def best(self) -> Round:
        """The round with the highest critic score against the current plan (the earliest of equals)."""
        return max(self.rounds, key=lambda r: (self.score_of(r), -r.index))

    @property
    def best_critique(self) -> Critique | None:
        return self.critique_of(self.best)

    @property
    def satisfied(self) -> bool:
        """The critic found nothing wrong with the best round (against the current plan)."""
        crit = self.best_critique
        return crit is not None and crit.ok

    def plan_pair(self) -> tuple[str, str] | None:
        """(chosen, rejected) plans when a revision ran: the plan drawn in the best-scoring rounds (the best round
        per drawn plan, each scored against what its round was critiqued against: the intended plan, or with
        ``revise_reference="revised"`` the revised one), the other rejected; None without a revision or on a
        tie."""
        best: dict[str, float] = {}
        for r in self.rounds:
            plan = r.drawn or r.plan or self.plan
            best[plan] = max(best.get(plan, -1.0), r.score)
        if len(best) < 2:
            return None
        ranked = sorted(best.items(), key=lambda kv: kv[1])
        (worst, lo), (top, hi) = ranked[0], ranked[-1]
        return (top, worst) if hi > lo else None

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
        return Trajectory(self.prompt, self.plan, kept, self.grammar)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "plan": self.plan,
            "final_plan": self.current_plan,
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
                    "plan": r.plan or self.plan,
                    "drawn_plan": r.drawn or r.plan or self.plan,
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
    """Runs the loop for a `Plan2ImgPipeline` with a `PlanReader` critic; ``reviser`` (a `PlanReviser`) enables
    the ``revise`` move."""

    def __init__(self, pipe: Plan2ImgPipeline, critic: PlanReader, config: RefineConfig | None = None,
                 reviser: PlanReviser | None = None):  # fmt: skip
        self.pipe, self.critic, self.reviser = pipe, critic, reviser
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
        trajs = [Trajectory(prompt, plan, [], self.grammar) for prompt, plan in zip(prompts, plans)]
        state = _BatchState(list(prompts), cond, [s + cfg.seed_stride for s in seeds], n)
        latents = self._generate(cond, null, list(seeds))
        share = {"conditioning": (t1 - t0) / n, "generate": (time.perf_counter() - t1) / n}
        self._add(trajs, state, list(range(n)), "generate", list(seeds), 1.0, latents, share)
        while groups := self._next_moves(trajs, state, budget):
            for move, idx in groups.items():
                seeds_now = [trajs[i].best.seed if move == "emphasis" else state.next_seed[i] for i in idx]
                t0 = time.perf_counter()
                new = self._move(move, state.cond_rows(idx), _rows(null, idx), state.best_latents(trajs, idx),
                                 [trajs[i] for i in idx], seeds_now)  # fmt: skip
                share = {"generate": (time.perf_counter() - t0) / len(idx)}
                self._add(trajs, state, idx, move, seeds_now, self._cost(move), new, share)
                state.record(trajs, idx, move, cfg.seed_stride)
        return trajs

    def _next_moves(self, trajs: list[Trajectory], state: _BatchState, budget: float) -> dict[str, list[int]]:
        """The trajectories that go on, grouped by their next move; a trajectory stops when its critic is
        satisfied, its rounds are spent, or its next move does not fit the budget (then for good)."""
        going = [i for i, t in enumerate(trajs)
                 if not state.stopped[i] and len(t.rounds) < self.config.rounds and not t.satisfied]  # fmt: skip
        self._offer_revisions(trajs, state, going)
        groups: dict[str, list[int]] = {}
        for i in going:
            move = self._choose(trajs[i], state, i)
            if move is None or trajs[i].cost + self._cost(move) > budget + 1e-9:
                state.stopped[i] = True
                continue
            state.commit(i, move, rescore=self.config.revise_reference == "revised")
            groups.setdefault(move, []).append(i)
        return groups

    def _write_plans(self, prompts: list[str]) -> list[str]:
        out = []
        for prompt, result in zip(prompts, self.pipe.writer.plan(prompts)):
            if result.plan is None:
                raise InputError(f"the planner produced no valid plan for {prompt!r}: {result.error}")
            out.append(result.plan.to_text())
        return out

    def _offer_revisions(self, trajs: list[Trajectory], state: _BatchState, going: list[int]) -> None:
        """At a trajectory's first failed critique, the reviser reads (prompt, plan, critique); a revised plan that
        says something else becomes the trajectory's proposal (with its conditioning), taken by ``_choose``."""
        if self.reviser is None or "revise" not in self.config.moves:
            return
        ask = [i for i in going if not state.asked[i] and trajs[i].best_critique is not None]
        if not ask:
            return
        t0 = time.perf_counter()
        current = [trajs[i].current_plan for i in ask]
        results = self.reviser.revise([state.prompts[i] for i in ask], current,
                                      [trajs[i].best_critique.text for i in ask])  # fmt: skip
        changed = []
        for i, plan, result in zip(ask, current, results):
            state.asked[i] = True
            if result.plan is not None and not critique(Plan.parse(plan), result.plan, self.grammar).ok:
                changed.append((i, result.plan.to_text()))
        if changed:
            cond, _ = self.pipe.conditioning_for([state.prompts[i] for i, _ in changed], [p for _, p in changed])
            for j, (i, plan) in enumerate(changed):
                state.proposals[i] = (plan, _rows(cond, [j]))
        for i in ask:
            state.revise_seconds[i] = (time.perf_counter() - t0) / len(ask)

    # ------------------------------------------------------------------------------------------ moves
    def _cost(self, move: str) -> float:
        cfg = self.config
        return {"local": cfg.local_strength, "sdedit": cfg.sdedit_strength}.get(move, 1.0)

    def _choose(self, traj: Trajectory, state: _BatchState, i: int) -> str | None:
        """The next move of trajectory ``i`` (None: no allowed move applies, e.g. emphasis alone, once tried)."""
        cfg = self.config
        allowed = [m for m in MOVES if m in cfg.moves]
        crit = traj.best_critique
        if i in state.proposals:
            return "revise"
        if (state.fails[i] >= cfg.patience or crit is None) and "reseed" in allowed:
            return "reseed"  # edits keep failing, or the critic could not read the image: nothing to edit by
        if (
            crit is not None
            and cfg.scene_reseed
            and "reseed" in allowed
            and any(f.object is None and f.kind != "extra" for f in crit.findings)
        ):
            return "reseed"  # style / lighting / camera are global: an edit that keeps the composition keeps them
        if crit is not None and crit.failing_objects():
            if "emphasis" in allowed and not state.emphasized[i] and self.pipe.bridge.config.spatial:
                return "emphasis"
            if "local" in allowed:
                return "local"
        if "sdedit" in allowed:
            return "sdedit"
        if "reseed" in allowed:
            return "reseed"
        return "local" if "local" in allowed else None

    def _generate(self, cond, null, seeds: list[int], **kwargs) -> torch.Tensor:
        cfg = self.config
        unet = self.pipe.backbone.unet
        return sample(unet, self.pipe.backbone.scheduler(cfg.sampler), cond, null, num_inference_steps=cfg.steps,
                      guidance_scale=cfg.guidance_scale, generator=seeded_generators(seeds), progress=False,
                      **kwargs)  # fmt: skip

    def _move(self, move: str, cond, null, best_latents, trajs: list[Trajectory], seeds: list[int]) -> torch.Tensor:
        """One move for a group of trajectories; ``best_latents`` (G, C, h, w) are the latents of their best."""
        cfg = self.config
        if move in ("reseed", "revise"):
            return self._generate(cond, null, seeds)
        if move == "emphasis":
            return self._generate(self._emphasize(cond, trajs), null, seeds)
        if move == "sdedit":
            return self._generate(cond, null, seeds, init_latents=best_latents, strength=cfg.sdedit_strength)
        size = best_latents.shape[-2:]
        keeps = [self._keep_mask(t.current_plan, t.best_critique, size) for t in trajs]
        # no region to keep: edit the whole image (a keep mask of zeros blends nothing in)
        keep = torch.cat([torch.zeros(1, 1, *size) if k is None else k for k in keeps]).to(best_latents)
        return self._generate(cond, null, seeds, init_latents=best_latents, strength=cfg.local_strength,
                              keep_mask=keep)  # fmt: skip

    def _emphasize(self, cond, trajs: list[Trajectory]):
        """``cond`` with each trajectory's failing objects' region tokens scaled by ``emphasis_weight``."""
        if callable(cond) and not isinstance(cond, Conditioning):
            return lambda t, cond=cond: self._emphasize(cond(t), trajs)
        if cond.regions is None:
            return cond
        weights = torch.ones(cond.tokens.shape[:2], dtype=cond.tokens.dtype, device=cond.tokens.device)
        for j, traj in enumerate(trajs):
            for k in self._failing_regions(traj):
                weights[j][cond.regions.token_region[j] == k + 1] = self.config.emphasis_weight
        return dataclasses.replace(cond, tokens=cond.tokens * weights[..., None])

    def _failing_regions(self, traj: Trajectory) -> list[int]:
        """Region indices (OBJECT entries of the drawn plan as the bridge reads it) of the best round's failing
        objects (those the drawn plan has)."""
        plan = traj.current_plan
        read = self.pipe.read_texts([traj.prompt], [traj.drawn_plan])[1][0]
        try:
            mine = Plan.parse(plan).structured_objects(self.grammar)
            theirs = [o.to_text() for o in Plan.parse(read).structured_objects(self.grammar)]
        except (PlanError, AttributeError):  # free-text objects: nothing to match regions by
            return []
        return [theirs.index(mine[i].to_text()) for i in traj.best_critique.failing_objects()
                if i < len(mine) and mine[i].to_text() in theirs]  # fmt: skip

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
    def _add(self, trajs: list[Trajectory], state: _BatchState, idx: list[int], move: str, seeds: list[int],
             cost: float, latents, timings: dict[str, float]) -> None:  # fmt: skip
        """Decode a group's latents, let the critic read them against each trajectory's plan, and append a round
        to each of its trajectories."""
        t0 = time.perf_counter()
        images = decode_latents(self.pipe.backbone.vae, latents)
        t1 = time.perf_counter()
        readings = self._read(images)
        t2 = time.perf_counter()
        share = {**timings, "decode": (t1 - t0) / len(idx), "critic": (t2 - t1) / len(idx)}
        for j, i in enumerate(idx):
            reading, note = readings[j]
            plan = state.plans[i] or trajs[i].plan
            crit = None if reading is None else critique(Plan.parse(plan), reading, self.grammar)
            extra = {"revise": state.revise_seconds.pop(i)} if i in state.revise_seconds and move == "revise" else {}
            traj = trajs[i]
            traj.rounds.append(Round(len(traj.rounds), move, seeds[j], cost, images[j], crit, share | extra, note,
                                     state.plans[i], state.drawn.get(i)))  # fmt: skip
            state.latents[i].append(latents[j])

    def _read(self, images: np.ndarray) -> list[tuple[Plan | None, str | None]]:
        """The critic's reading of each image; where it fails, the images are read one by one, and an image it
        cannot read gets no reading (its round scores 0) and a note saying why."""
        try:
            return [(r.plan, None) for r in self.critic.read(images)]
        except CriticError as err:
            if len(images) == 1:
                return [(None, f"critic failed: {err}")]
        return [self._read(images[j : j + 1])[0] for j in range(len(images))]


class _BatchState:
    """Per trajectory of a batch: every round's latents, failed edits in a row, its next seed, whether it stopped,
    its plan and conditioning after a revision (None: the batch's), whether the reviser was asked and emphasis
    tried, and a revised plan waiting to be drawn."""

    def __init__(self, prompts: list[str], cond, next_seed: list[int], n: int):
        self.prompts, self.cond, self.next_seed = prompts, cond, next_seed
        self.latents: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.fails, self.stopped = [0] * n, [False] * n
        self.plans: list[str | None] = [None] * n
        self.drawn: dict[int, str] = {}  # a revised plan drawn but not scored against
        self.own_cond: dict[int, object] = {}
        self.asked, self.emphasized = [False] * n, [False] * n
        self.proposals: dict[int, tuple[str, object]] = {}
        self.revise_seconds: dict[int, float] = {}

    def best_latents(self, trajs: list[Trajectory], idx: list[int]) -> torch.Tensor:
        return torch.stack([self.latents[i][trajs[i].best.index] for i in idx])

    def cond_rows(self, idx: list[int]):
        """The conditioning of rows ``idx``: the batch's, with revised rows replaced by their own."""
        if not any(i in self.own_cond for i in idx):
            return _rows(self.cond, idx)
        rows = [self.own_cond[i] if i in self.own_cond else _rows(self.cond, [i]) for i in idx]
        if any(callable(r) and not isinstance(r, Conditioning) for r in rows):
            return lambda t: Conditioning.cat([r(t) if not isinstance(r, Conditioning) else r for r in rows])
        return Conditioning.cat(rows)

    def commit(self, i: int, move: str, rescore: bool = False) -> None:
        """Trajectory ``i`` makes ``move`` next: a revision's conditioning becomes its own, and with ``rescore``
        its plan too (what the critic scores against)."""
        if move == "revise":
            plan, self.own_cond[i] = self.proposals.pop(i)
            if rescore:
                self.plans[i] = plan
            else:
                self.drawn[i] = plan
        elif move == "emphasis":
            self.emphasized[i] = True

    def record(self, trajs: list[Trajectory], idx: list[int], move: str, stride: int) -> None:
        """After a move: the next seed (emphasis reuses the best round's seed and takes none), and the count of
        failed edits (reset when the move made the best round, or when it was a fresh generation)."""
        for i in idx:
            if move != "emphasis":
                self.next_seed[i] += stride
            traj = trajs[i]
            if traj.best is traj.rounds[-1]:
                self.fails[i] = 0
            else:
                self.fails[i] = 0 if move in ("reseed", "revise") else self.fails[i] + 1


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
        if r.move == "revise" and (r.drawn or r.plan):
            body = f"revised plan: {draft_text(r.drawn or r.plan)}. {body}"
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
