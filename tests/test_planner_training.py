"""Toy planner training (TRL SFT) on a tiny data set, and the planner metrics."""

import json

import pytest

from alignment.planner_sft import PlannerTrainConfig, eval_prompts, plan_metrics, train_bpe_tokenizer, train_planner
from planner.planner import Planner, PlanResult
from planner.schema import PLANNING_TOKENS, Plan
from toyworld import vocab as V
from toyworld.data import build_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("pdata") / "ds"
    build_dataset(path, n=96, seed=1, workers=1, progress=False)
    return path


def test_sft_trains_saves_and_resumes(tiny_data, tmp_path):
    cfg = PlannerTrainConfig(
        data=str(tiny_data),
        out=str(tmp_path / "p"),
        vocab_size=300,
        hidden_size=32,
        layers=1,
        heads=2,
        intermediate_size=64,
        epochs=2,
        batch_size=16,
        save_steps=4,
        logging_steps=2,
    )
    final = train_planner(cfg)
    logs = [json.loads(line) for line in (tmp_path / "p" / "log.jsonl").read_text().splitlines()]
    assert any("loss" in rec for rec in logs)
    planner = Planner.from_pretrained(final, spec=V.TOY_PLAN_SPEC)
    assert all(t in planner.tokenizer.get_vocab() for t in PLANNING_TOKENS)
    r = planner.plan(["a red circle"])[0]
    assert r.plan is not None and r.plan.is_valid(planner.spec)
    # running again finds the finished run's checkpoint and resumes from it (no new steps)
    cfg2 = PlannerTrainConfig(**{**cfg.__dict__, "epochs": 3})
    train_planner(cfg2)
    steps = [json.loads(line).get("step") for line in (tmp_path / "p" / "log.jsonl").read_text().splitlines()]
    assert max(steps) > max(rec["step"] for rec in logs)


def test_bpe_tokenizer_has_atomic_planning_tokens():
    tok = train_bpe_tokenizer(["a red circle", "<IMG_BEGIN> <STYLE> plain background <IMG_END>"], 300)
    ids = tok("x <STYLE> plain", add_special_tokens=False).input_ids
    assert tok.convert_tokens_to_ids("<STYLE>") in ids


def test_plan_metrics_on_known_answers():
    prompts, gold = eval_prompts("heldout", 4, seed=0)
    right = [PlanResult(p, Plan.parse(g), g, [], "end") for p, g in zip(prompts, gold)]
    m = plan_metrics(right, gold, V.TOY_PLAN_SPEC)
    assert m["exact_match"] == 1.0 and m["parse_rate"] == 1.0 and m["object_f1"] == 1.0
    assert all(v == 1.0 for v in m["field_f1"].values())
    wrong = [PlanResult(p, None, "<IMG_BEGIN> junk", [], "eos", error="x") for p in prompts]
    m = plan_metrics(wrong, gold, V.TOY_PLAN_SPEC)
    assert m["exact_match"] == 0.0 and m["parse_rate"] == 0.0 and m["object_f1"] == 0.0
    shifted = right[1:] + right[:1]
    assert plan_metrics(shifted, gold, V.TOY_PLAN_SPEC)["exact_match"] < 1.0
