"""The critic (an image-text-to-text model reading images as plans), `critique`, and the refine loop on tiny
real components: it terminates within its budget, the same seed gives the same trajectory, a failing critic
never loses the rounds done, and the strip + JSON are written."""

import dataclasses
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import save_tiny_planner, save_tiny_toy_base

from alignment.critic_training import (
    CriticTrainConfig,
    build_toy_critic,
    critic_prompt,
    pixels,
    save_critic,
    train_critic,
    unet_round_trips,
)
from alignment.preference import IMAGE_PAIR_COLUMNS, PLAN_PAIR_COLUMNS, PairWriter
from alignment.prepared import cached_split
from diffusion_backbone.models import load_backbone
from llm_bridge.bridge import LLMBridge
from llm_bridge.connector import ConnectorConfig
from llm_bridge.pipeline import Plan2ImgPipeline
from llm_bridge.refine import RefineConfig, Refiner, Round, Trajectory, _BatchState, best_of
from plan2img.cli import main
from planner.critic import CriticError, PlanReader, critique
from planner.planner import Planner, PlanResult
from planner.reviser import PlanReviser, revision_request
from planner.schema import IMG_BEGIN, Plan
from safeio import InputError
from toyworld import vocab as V
from toyworld.data import build_dataset, load_dataset_dir

G = V.TOY_PLAN_SPEC.object_grammar
BASE = "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 2 objects, left to right {objs} <COLOR> red, blue <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>"  # noqa: E501
WANT = BASE.format(objs="<OBJECT> 1 small red circle at left <OBJECT> 2 medium blue square at top right, bottom right")


def plan(objs: str, **changes) -> Plan:
    p = Plan.parse(BASE.format(objs=objs))
    return Plan(**{**p.__dict__, **changes})


# ------------------------------------------------------------------------------------------ critique
def test_a_reading_equal_to_the_plan_is_ok():
    c = critique(Plan.parse(WANT), Plan.parse(WANT), G)
    assert c.ok and c.score == 1.0 and c.text == "The image matches the plan."


def test_critique_names_each_wrong_field_and_object():
    want = Plan.parse(WANT)
    read = plan("<OBJECT> 1 small green circle at right <OBJECT> 1 medium blue square at top right "
                "<OBJECT> 1 large yellow star at center", lighting="dim light")  # fmt: skip
    c = critique(want, read, G)
    kinds = sorted((f.kind, f.object) for f in c.findings)
    assert kinds == sorted([("lighting", None), ("color", 0), ("position", 0), ("count", 1), ("position", 1),
                            ("extra", 2)])  # fmt: skip
    assert 0.0 < c.score < 1.0 and c.failing_objects() == [0, 1]
    assert "color: green instead of red" in c.text and "extra object: 1 large yellow star at center" in c.text
    missing = critique(want, plan("<OBJECT> 1 small red circle at left"), G)
    assert [f.kind for f in missing.findings] == ["missing"] and missing.failing_objects() == [1]
    assert missing.score < c.score or missing.score < 1.0
    free = critique(want, plan("<OBJECT> 1 small red circle at left"))  # no grammar: whole OBJECT texts
    assert [f.kind for f in free.findings] == ["missing"]


# ------------------------------------------------------------------------------------------ the reader
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic_world")
    build_dataset(root / "data", n=32, seed=7, workers=1, heldout_fraction=0.1, progress=False)
    prompts = list(load_dataset_dir(root / "data")["prompt"])
    planner = save_tiny_planner(root / "llm")
    cfg = CriticTrainConfig(data=str(root / "data"), planner=str(planner), base=None, out=str(root / "critic"),
                            vision_width=32, vision_layers=1, text_width=32, text_layers=1, batch_size=4,
                            max_steps=3, warmup=1, log_every=1, max_examples=16)  # fmt: skip
    return {"root": root, "base": save_tiny_toy_base(root / "base", prompts), "planner": planner,
            "critic_cfg": cfg}  # fmt: skip


def test_unet_round_trips_keep_the_scene_and_train_the_critic(world):
    images, prompts, _ = cached_split(world["critic_cfg"].data, "train")
    images, prompts = np.asarray(images[:3]), prompts[:3]
    trips = unet_round_trips(str(world["base"]), images, prompts, (0.3, 0.3), steps=4, seed=1, batch=2,
                             progress=False)  # fmt: skip
    alone = unet_round_trips(str(world["base"]), images[2:], prompts[2:], (0.3, 0.3), steps=4, seed=1, batch=2,
                             progress=False)  # fmt: skip
    assert trips.shape == images.shape and trips.dtype == np.uint8 and not np.array_equal(trips, images)
    assert not np.array_equal(trips[2], alone[0])  # the seed of image i is seed and i, not its batch position
    cfg = dataclasses.replace(world["critic_cfg"], base=str(world["base"]), vae_fraction=0.25, unet_fraction=0.25,
                              unet_steps=2, out=str(world["root"] / "critic_unet"), max_steps=2)  # fmt: skip
    train_critic(cfg, progress=False)
    assert len(list((world["root"] / "critic_unet" / "cache").glob("unet_round_trips_*.npy"))) == 1


def test_the_processor_normalises_as_training_does(world):
    _, processor = build_toy_critic(world["critic_cfg"])
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    enc = processor(images=list(images), text=[critic_prompt() + " " + IMG_BEGIN] * 2, return_tensors="pt")
    torch.testing.assert_close(enc["pixel_values"], pixels(images))


def test_critic_trains_saves_and_reads_images_as_plans(world):
    folder = train_critic(world["critic_cfg"], progress=False)
    log = [json.loads(x) for x in (world["root"] / "critic" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(np.isfinite(r["loss"]) for r in log)
    reader = PlanReader.from_pretrained(folder, spec=V.TOY_PLAN_SPEC)  # AutoModelForImageTextToText
    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    first, again = reader.read(images), reader.read(images)
    assert [r.plan.to_text() for r in first] == [r.plan.to_text() for r in again]
    for r in first:  # constrained decoding: every reading is a valid toy plan
        assert Plan.parse(r.plan.to_text(), V.TOY_PLAN_SPEC).objects
    with pytest.raises(ValueError, match="uint8 images"):
        reader.read(images.astype(np.float32))


def test_a_critic_that_raises_gives_a_clear_error(world):
    model, processor = build_toy_critic(world["critic_cfg"])
    reader = PlanReader(model.eval(), processor, V.TOY_PLAN_SPEC)

    def broken(**kwargs):
        raise RuntimeError("out of memory")

    reader.model.generate = broken
    with pytest.raises(CriticError, match=r"images #0\.\.#1: out of memory"):
        reader.read(np.zeros((2, 64, 64, 3), np.uint8))


# ------------------------------------------------------------------------------------------ the loop
def _refiner(world, **config):
    planner = Planner.from_pretrained(world["planner"], spec=V.TOY_PLAN_SPEC)
    backbone = load_backbone(world["base"])
    cfg = ConnectorConfig.from_preset("resampler-32q", d_llm=planner.model.config.hidden_size, width=32,
                                      d_ctx=backbone.unet.config.cross_attention_dim, spatial=True,
                                      object_queries=4, init_std=0.5)  # fmt: skip
    torch.manual_seed(0)
    pipe = Plan2ImgPipeline(planner, LLMBridge(cfg, torch.randn(8, cfg.d_ctx), None), backbone)
    model, processor = build_toy_critic(world["critic_cfg"])
    critic = PlanReader(model.eval(), processor, V.TOY_PLAN_SPEC)
    return Refiner(pipe, critic, RefineConfig(steps=3, sampler="ddim", **config))


def test_refine_terminates_within_budget_and_is_reproducible(world, tmp_path):
    refiner = _refiner(world, rounds=4)
    a, b = refiner("two blue squares", seed=3, plan=WANT), refiner("two blue squares", seed=3, plan=WANT)
    assert 1 <= len(a.rounds) <= 4 and a.cost <= 4 + 1e-9
    assert a.rounds[0].move == "generate" and a.rounds[0].cost == 1.0
    assert [(r.move, r.seed, r.score) for r in a.rounds] == [(r.move, r.seed, r.score) for r in b.rounds]
    for ra, rb in zip(a.rounds, b.rounds):
        np.testing.assert_array_equal(ra.image, rb.image)
    assert a.best.score == max(r.score for r in a.rounds)
    png, meta = a.save(tmp_path / "strip.png", scale=2)
    assert Image.open(png).size[0] >= 2 * 16 * len(a.rounds)
    record = json.loads(meta.read_text())
    assert record["plan"] == Plan.parse(WANT).to_text() and len(record["rounds"]) == len(a.rounds)
    assert {"move", "seed", "score", "critique", "timings", "diffusion_calls"} <= set(record["rounds"][0])
    only_reseed = _refiner(world, rounds=3, moves=("reseed",))("two blue squares", seed=3, plan=WANT)
    assert {r.move for r in only_reseed.rounds[1:]} <= {"reseed"}


def test_local_edits_redraw_failing_objects_and_where_the_reading_puts_wrong_ones(world):
    refiner = _refiner(world)
    reading = plan("<OBJECT> 1 small red circle at left <OBJECT> 2 medium blue square at top left, top right "
                   "<OBJECT> 1 small green star at top")  # fmt: skip
    crit = critique(Plan.parse(WANT), reading, G)
    assert {f.kind for f in crit.findings} == {"position", "extra"} and crit.failing_objects() == [1]
    size = (16, 16)
    grid = refiner.pipe.grid

    def core(name):
        return grid.box_mask(grid.centers[name], size) >= 1

    keep = refiner._keep_mask(WANT, crit, size)[0, 0]
    for name in ("top right", "bottom right", "top left", "top"):  # intended (twice), found, extra
        assert (keep[core(name)] == 0).all(), name
    assert (keep[core("bottom left")] == 1).any()  # nothing wrong there: kept
    only_intended = _refiner(world, clear_found=False)._keep_mask(WANT, crit, size)[0, 0]
    assert (only_intended[core("top right")] == 0).all() and (only_intended[core("bottom right")] == 0).all()
    assert (only_intended[core("top left")] == 1).any()  # without clear_found, the misplaced square stays


def test_a_wrong_scene_field_gets_a_reseed_and_a_wrong_object_emphasis_then_a_local_edit(world):
    want = Plan.parse(WANT)
    dim = critique(want, Plan(**{**want.__dict__, "lighting": "dim light"}), G)
    assert [f.kind for f in dim.findings] == ["lighting"]
    moved = critique(want, plan("<OBJECT> 1 small red circle at right <OBJECT> 2 medium blue square at top right, "
                                "bottom right"), G)  # fmt: skip
    image = np.zeros((8, 8, 3), np.uint8)
    three = ("local", "sdedit", "reseed")
    for critic_says, on, off in ((dim, "reseed", "sdedit"), (moved, "local", "local")):
        traj = Trajectory("p", WANT, [Round(0, "generate", 0, 1.0, image, critic_says)], G)
        assert _refiner(world, moves=three)._choose(traj, _BatchState(["p"], None, [100], 1), 0) == on
        assert _refiner(world, moves=three, scene_reseed=False)._choose(traj, _BatchState(["p"], None, [100], 1),
                                                                        0) == off  # fmt: skip
    traj = Trajectory("p", WANT, [Round(0, "generate", 0, 1.0, image, moved)], G)
    assert _refiner(world)._choose(traj, _BatchState(["p"], None, [100], 1), 0) == "local"  # emphasis is opt-in
    state, refiner = _BatchState(["p"], None, [100], 1), _refiner(world, moves=("local", "emphasis", "reseed"))
    assert refiner._choose(traj, state, 0) == "emphasis"  # tried once, before the local edits
    state.commit(0, "emphasis")
    assert refiner._choose(traj, state, 0) == "local"
    assert _refiner(world, moves=("emphasis",))._choose(traj, state, 0) is None  # nothing left: the loop stops


def test_emphasis_scales_only_the_failing_objects_tokens(world):
    refiner = _refiner(world, emphasis_weight=2.0)
    moved = critique(Plan.parse(WANT), plan("<OBJECT> 1 small red circle at left <OBJECT> 2 medium blue square at "
                                            "top left, bottom right"), G)  # fmt: skip
    assert moved.failing_objects() == [1]
    traj = Trajectory("p", WANT, [Round(0, "generate", 0, 1.0, np.zeros((8, 8, 3), np.uint8), moved)], G)
    cond, _ = refiner.pipe.conditioning_for(["p"], [WANT])
    out = refiner._emphasize(cond, [traj])
    region = refiner._failing_regions(traj)
    assert len(region) == 1
    hit = cond.regions.token_region[0] == region[0] + 1
    assert hit.any() and (~hit).any()
    torch.testing.assert_close(out.tokens[0][hit], 2.0 * cond.tokens[0][hit])
    torch.testing.assert_close(out.tokens[0][~hit], cond.tokens[0][~hit])


class FixedReviser(PlanReviser):
    """A reviser that always answers ``answer`` (and records what it was asked)."""

    def __init__(self, answer: str):
        self.answer, self.asked = Plan.parse(answer), []

    def revise(self, prompts, plans, critiques):
        self.asked += list(zip(prompts, plans, critiques))
        return [PlanResult(p, self.answer, self.answer.to_text(), [], "end") for p in prompts]


@pytest.mark.parametrize("reference", ["original", "revised"])
def test_revise_draws_the_revised_plan_and_scores_against_the_chosen_reference(world, tmp_path, reference):
    other, want = Plan.parse(BASE.format(objs="<OBJECT> 1 large red circle at center")).to_text(), Plan.parse(WANT)
    reviser = FixedReviser(other)
    refiner = _refiner(world, rounds=4, moves=("revise", "reseed"), revise_reference=reference)
    refiner.reviser = reviser
    traj = refiner("two blue squares", seed=5, plan=WANT)
    assert not traj.rounds[0].critique.ok  # the untrained tiny critic's reading differs: there is something to revise
    assert len(reviser.asked) == 1 and reviser.asked[0][1] == want.to_text()
    assert "Score" in reviser.asked[0][2]  # the critique text
    assert traj.rounds[1].move == "revise" and traj.rounds[1].seed == 5 + 100 and "revise" in traj.rounds[1].timings
    assert {r.move for r in traj.rounds[2:]} <= {"reseed"} and traj.drawn_plan == other
    record = json.loads(traj.save(tmp_path / "s.png")[1].read_text())
    assert record["rounds"][0]["plan"] == want.to_text() and record["rounds"][1]["drawn_plan"] == other
    if reference == "revised":  # the revised plan is what every round is scored against
        assert traj.rounds[1].plan == other and traj.current_plan == other
        assert traj.critique_of(traj.rounds[0]).intended.to_text() == other  # round 0 compared again
        assert record["final_plan"] == other and record["rounds"][1]["plan"] == other
    else:  # a generation control only: every round is scored against the intended plan
        assert traj.rounds[1].drawn == other and traj.current_plan == want.to_text()
        assert all(r.critique.intended == want for r in traj.rounds if r.critique is not None)
        assert record["final_plan"] == want.to_text() and record["rounds"][1]["plan"] == want.to_text()
    assert traj.best.index == max(traj.rounds, key=lambda r: (traj.score_of(r), -r.index)).index
    drawn = [r.drawn or r.plan or traj.plan for r in traj.rounds]
    own = {p: max(r.score for r, d in zip(traj.rounds, drawn) if d == p) for p in (want.to_text(), other)}
    if len(set(own.values())) == 2:  # the plan drawn in the better-scoring rounds is chosen
        chosen, rejected = traj.plan_pair()
        assert own[chosen] > own[rejected] and {chosen, rejected} == set(own)
    for rounds in (1, 2, 3):  # the prefix property holds through a revision
        short = _refiner(world, rounds=rounds, moves=("revise", "reseed"), revise_reference=reference)
        short.reviser = FixedReviser(other)
        got = short("two blue squares", seed=5, plan=WANT)
        cut = traj.prefix(rounds)
        assert [(r.move, r.seed) for r in got.rounds] == [(r.move, r.seed) for r in cut.rounds]
        assert got.best.index == cut.best.index
    same = _refiner(world, rounds=3, moves=("revise", "reseed"), revise_reference=reference)
    same.reviser = FixedReviser(WANT)  # a revision that says the same: no revise round, the other moves go on
    unrevised = same("two blue squares", seed=5, plan=WANT)
    assert "revise" not in {r.move for r in unrevised.rounds} and unrevised.plan_pair() is None
    with pytest.raises(InputError, match="revise_reference"):
        RefineConfig(revise_reference="both")


def test_a_tiny_planner_runs_as_reviser_through_the_loop(world):
    refiner = _refiner(world, rounds=3, moves=("local", "sdedit", "reseed", "revise", "emphasis"))
    refiner.reviser = PlanReviser(Planner.from_pretrained(world["planner"], spec=V.TOY_PLAN_SPEC))
    traj = refiner("two blue squares", seed=5, plan=WANT)
    assert 1 <= len(traj.rounds) <= 3 and traj.cost <= 3 + 1e-9
    for r in traj.rounds[1:]:
        assert r.move in {"revise", "emphasis", "local", "sdedit", "reseed"}
        Plan.parse(r.plan or traj.plan)


def test_revision_requests_carry_the_prompt_the_draft_and_the_critique():
    text = revision_request("a red circle", WANT, "Score 0.50. missing: 1 red circle.")
    assert text.startswith("a red circle | draft: <STYLE> plain background <LAYOUT>")
    assert IMG_BEGIN not in text and "<IMG_END>" not in text and "<OBJECT> 1 small red circle at left" in text
    assert text.endswith("critique: Score 0.50. missing: 1 red circle.")
    assert revision_request("p", WANT, None).endswith("critique: The image matches the plan.")
    with pytest.raises(InputError, match="one plan and one critique per prompt"):
        PlanReviser(None).revise(["a"], [], [])


def test_a_shorter_run_is_the_prefix_of_a_longer_one(world):
    long = _refiner(world, rounds=4)("two blue squares", seed=5, plan=WANT)
    for rounds in (1, 2, 3):
        short = _refiner(world, rounds=rounds)("two blue squares", seed=5, plan=WANT)
        cut = long.prefix(rounds)
        assert [(r.move, r.seed, r.cost) for r in cut.rounds] == [(r.move, r.seed, r.cost) for r in short.rounds]
        for rc, rs in zip(cut.rounds, short.rounds):
            np.testing.assert_array_equal(rc.image, rs.image)
        assert cut.best.index == short.best.index and cut.cost <= rounds + 1e-9
    assert {"conditioning", "generate", "decode", "critic"} <= set(long.rounds[0].timings)
    assert {"generate", "decode", "critic"} <= set(long.rounds[-1].timings)


def test_best_of_k_read_off_a_larger_run_equals_its_own_run(world):
    refiner = _refiner(world)
    pipe, prompts, seeds = refiner.pipe, ["two blue squares", "a red circle"], [7, 8]

    def generate(ps, ss):
        return pipe(ps, ss, plans=[WANT] * len(ps), sampler="ddim", steps=2, batch_size=len(ps)).images

    big = best_of(generate, refiner.critic, prompts, [WANT] * 2, seeds, 3, G)
    small = best_of(generate, refiner.critic, prompts, [WANT] * 2, seeds, 2, G)
    assert big.picks_within(2) == small.picks
    assert big.picks_within(3) == big.picks and big.picks_within(1) == [0, 0]
    for i in range(2):
        np.testing.assert_array_equal(big.candidates[i][:2], small.candidates[i])


def test_a_batch_of_trajectories_is_the_trajectories_run_alone(world):
    refiner = _refiner(world, rounds=4)
    prompts, seeds = ["two blue squares", "a red circle", "two blue squares"], [3, 4, 9]
    batch = refiner.run_batch(prompts, seeds, [WANT] * 3)
    for prompt, seed, got in zip(prompts, seeds, batch):
        alone = refiner(prompt, seed, WANT)
        assert [(r.move, r.seed, r.cost) for r in got.rounds] == [(r.move, r.seed, r.cost) for r in alone.rounds]
        for a, b in zip(got.rounds, alone.rounds):
            assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1  # batched kernels round differently
    assert len({len(t.rounds) for t in batch} | {0}) >= 2


def test_a_critic_failing_on_one_image_of_a_batch_costs_only_that_image(world):
    refiner = _refiner(world, rounds=2)
    read, calls = refiner.critic.read, []

    def flaky(images, **kwargs):  # fails on a batch, and on the first image read alone
        calls.append(len(images))
        if len(images) > 1 or calls.count(1) == 1:
            raise CriticError("the critic failed on images #0..#0: nonsense")
        return read(images, **kwargs)

    refiner.critic.read = flaky
    trajs = refiner.run_batch(["a", "b"], [1, 2], [WANT] * 2)
    assert trajs[0].rounds[0].note and "nonsense" in trajs[0].rounds[0].note
    assert trajs[1].rounds[0].note is None and trajs[1].rounds[0].critique is not None


def test_a_failing_critic_keeps_the_rounds_and_falls_back_to_reseeding(world):
    refiner = _refiner(world, rounds=3)

    def broken(images, **kwargs):
        raise CriticError("the critic failed on images #0..#0: nonsense")

    refiner.critic.read = broken
    traj = refiner("two blue squares", seed=1, plan=WANT)
    assert len(traj.rounds) == 3 and all(r.note and "nonsense" in r.note for r in traj.rounds)
    assert [r.move for r in traj.rounds[1:]] == ["reseed", "reseed"] and [r.seed for r in traj.rounds] == [1, 101, 201]


# ------------------------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def saved(world):
    refiner = _refiner(world)
    root = world["root"]
    bridge = refiner.pipe.bridge.save_pretrained(root / "bridge")
    critic = save_critic(refiner.critic.model, refiner.critic.processor, root / "critic_untrained")
    return {"bridge": bridge, "critic": critic}


def _models(world, saved):
    return ["--model", str(world["base"]), "--llm", str(world["planner"]), "--bridge", str(saved["bridge"]),
            "--critic", str(saved["critic"]), "--writer", "same", "--steps", "2"]  # fmt: skip


def test_cli_refine_writes_the_strip_its_json_and_a_pair(world, saved, tmp_path, capsys):
    out = tmp_path / "strip.png"
    args = ["refine", "two blue squares", "--rounds", "3", "-o", str(out), "--plan", WANT,
            "--pairs-out", str(tmp_path / "pairs"), "--reviser", str(world["planner"])]  # fmt: skip
    assert main(args + _models(world, saved)) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert 1 <= len(record["rounds"]) <= 3 and record["diffusion_calls"] <= 3
    printed = capsys.readouterr().out
    assert "best: round" in printed and "revised plan: None" not in printed
    if (tmp_path / "pairs" / "images").is_dir():  # a pair exists unless every round scored the same
        pairs = datasets.load_from_disk(str(tmp_path / "pairs" / "images"))
        assert set(IMAGE_PAIR_COLUMNS) <= set(pairs.column_names)


def test_cli_eval_best_of_and_refine_and_their_pairs_load_back(world, saved, tmp_path):
    common = ["eval", "--generate", "bridge", "--limit-per-task", "1", "--n-per-prompt", "1", "--reads", "prompt"]
    for flag in (["--best-of", "2"], ["--refine", "2"]):
        out = tmp_path / flag[0].strip("-")
        args = common + flag + ["--out", str(out), "--pairs-out", str(out / "pairs")] + _models(world, saved)
        assert main(args) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["best_of" if flag[0] == "--best-of" else "refine"] == 2
        assert summary["bridge"] == args[args.index("--bridge") + 1] and summary["unet_dpo"] is None  # provenance
        assert summary["device"] == "cpu"
    assert (
        main(common + ["--best-of", "2", "--refine", "2", "--out", str(tmp_path / "x")] + _models(world, saved)) == 2
    )


def test_cli_dpo_trains_a_unet_lora_on_pairs_and_generate_merges_it(world, saved, tmp_path):
    writer = PairWriter()
    rng = np.random.default_rng(0)
    for i in range(8):
        img = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
        writer.add_ranked(["two blue squares", "a red circle"][i % 2], img, [0.9, 0.1])
    writer.save(tmp_path / "pairs")
    out = tmp_path / "dpo"
    config = Path(__file__).resolve().parents[1] / "configs" / "toy_dpo.yaml"
    sets = [f"pairs={tmp_path / 'pairs' / 'images'}", f"out={out}", f"base={world['base']}",
            f"bridge={saved['bridge']}", f"planner={world['planner']}", "writer=null", "batch_size=3",
            "max_steps=2", "warmup=1", "log_every=1", "heldout_fraction=0.25", "lr=0.05"]  # fmt: skip
    assert main(["dpo", "--config", str(config), "--set", *sets]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all("heldout_implicit_acc" in r for r in log)
    models = _models(world, saved)
    i = models.index("--critic")
    gen = ["generate", "a red circle", "--plan", WANT, "--seed", "1"] + models[:i] + models[i + 2 :]
    assert main(gen + ["-o", str(tmp_path / "base.png")]) == 0
    assert main(gen + ["-o", str(tmp_path / "dpo.png"), "--unet-dpo", str(out / "final")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("base", "dpo"))
    assert a.shape == b.shape and not np.array_equal(a, b)
    both = tmp_path / "dpo_both"  # the connector (against a frozen copy) and the U-Net LoRA together
    assert main(["dpo", "--config", str(config), "--set", *sets, f"out={both}", "target=both"]) == 0
    assert (both / "final" / "unet_dpo.safetensors").is_file() and (both / "final" / "bridge").is_dir()
    before, after = (load_file(str(f / "model.safetensors")) for f in (saved["bridge"], both / "final" / "bridge"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("connector.") for k in changed)  # the connector moved, nothing else
    i = gen.index("--bridge")
    gen_both = gen[:i] + ["--bridge", str(both / "final" / "bridge")] + gen[i + 2 :]
    assert main(gen_both + ["-o", str(tmp_path / "both.png"), "--unet-dpo", str(both / "final")]) == 0
    c = np.asarray(Image.open(tmp_path / "both.png"))
    assert not np.array_equal(a, c) and not np.array_equal(b, c)
    assert main(["dpo", "--config", str(config), "--set", "beta_typo=1"]) == 2


def test_all_pairs_keeps_every_differently_scored_pair_ordered_by_score():
    img = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30, 40)])
    writer = PairWriter(all_pairs=True)
    assert writer.add_ranked("p", img, [0.5, 0.9, 0.5, 0.1])  # one tie (0 and 2): 6 - 1 = 5 pairs
    assert not writer.add_ranked("tie", img, [0.3] * 4)
    got = sorted((r["score_0"], r["score_1"]) for r in writer.image_rows)
    assert got == sorted([(0.9, 0.5), (0.9, 0.5), (0.9, 0.1), (0.5, 0.1), (0.5, 0.1)])
    for r in writer.image_rows:  # the winner's image is the higher-scored candidate's
        w = np.asarray(Image.open(io.BytesIO(r["jpg_0"])))[0, 0, 0]
        assert {10: 0.5, 20: 0.9, 30: 0.5, 40: 0.1}[int(w)] == pytest.approx(r["score_0"])
    one = PairWriter()
    assert one.add_ranked("p", img, [0.5, 0.9, 0.5, 0.1]) and len(one.image_rows) == 1
    assert (one.image_rows[0]["score_0"], one.image_rows[0]["score_1"]) == pytest.approx((0.9, 0.1))


def test_preference_pairs_keep_the_columns_and_drop_ties(tmp_path):
    writer = PairWriter()
    img = np.zeros((2, 8, 8, 3), np.uint8)
    assert not writer.add_ranked("tie", img, [0.5, 0.5])
    assert writer.add_ranked("a red circle", img, [0.2, 0.9])
    writer.add_plans(
        "a red circle", "<IMG_BEGIN> <OBJECT> 1 red circle <IMG_END>", "<IMG_BEGIN> <OBJECT> 1 circle <IMG_END>"
    )
    assert writer.save(tmp_path / "pairs") == {"images": 1, "plans": 1}
    images = datasets.load_from_disk(str(tmp_path / "pairs" / "images"))
    assert list(images.column_names[:5]) == list(IMAGE_PAIR_COLUMNS) and images[0]["label_0"] == 1.0
    assert Image.open(io.BytesIO(images[0]["jpg_0"])).size == (8, 8)
    plans = datasets.load_from_disk(str(tmp_path / "pairs" / "plans"))
    assert plans.column_names == list(PLAN_PAIR_COLUMNS)
