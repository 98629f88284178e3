"""Toy planner training (TRL SFT) on a tiny data set, and the planner metrics."""

import argparse
import json

import pytest
import torch
from tiny_models import load_script, save_tiny_llm
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.planner_sft import (
    PlannerTrainConfig,
    initial_model,
    plan_metrics,
    train_bpe_tokenizer,
    train_planner,
    training_rows,
)
from plan2img.cli import main
from planner.planner import Planner, PlanResult
from planner.reviser import PlanReviser, revision_request
from planner.schema import PLANNING_TOKENS, Plan
from toyworld import vocab as V
from toyworld.data import build_dataset, fresh_examples, load_dataset_dir, make_prompt_example, wide_rows
from toyworld.eval.metadata import metadata_prompts

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"


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
    prompts, gold = fresh_examples("heldout", 4, seed=0)
    right = [PlanResult(p, Plan.parse(g), g, [], "end") for p, g in zip(prompts, gold)]
    m = plan_metrics(right, gold, V.TOY_PLAN_SPEC)
    assert m["exact_match"] == 1.0 and m["parse_rate"] == 1.0 and m["object_f1"] == 1.0
    assert all(v == 1.0 for v in m["field_f1"].values())
    wrong = [PlanResult(p, None, "<IMG_BEGIN> junk", [], "eos", error="x") for p in prompts]
    m = plan_metrics(wrong, gold, V.TOY_PLAN_SPEC)
    assert m["exact_match"] == 0.0 and m["parse_rate"] == 0.0 and m["object_f1"] == 0.0
    shifted = right[1:] + right[:1]
    assert plan_metrics(shifted, gold, V.TOY_PLAN_SPEC)["exact_match"] < 1.0


def test_plan_metrics_exact_match_per_group():
    prompts, gold = fresh_examples("heldout", 4, seed=0)
    results = [PlanResult(p, Plan.parse(g), g, [], "end") for p, g in zip(prompts, gold)]
    results[3] = PlanResult(prompts[3], None, "<IMG_BEGIN> junk", [], "eos", error="x")
    m = plan_metrics(results, gold, V.TOY_PLAN_SPEC, groups=["a", "b", "a", "b"])
    assert m["exact_by_group"] == {"a": {"right": 2, "n": 2, "exact": 1.0}, "b": {"right": 1, "n": 2, "exact": 0.5}}
    assert m["exact_match"] == 0.75 and "exact_by_group" not in plan_metrics(results, gold, V.TOY_PLAN_SPEC)
    with pytest.raises(ValueError, match="3 labels for 4 results"):
        plan_metrics(results, gold, V.TOY_PLAN_SPEC, groups=["a", "b", "a"])


def test_sft_continues_from_init_with_wide_rows(tiny_data, tmp_path):
    first = PlannerTrainConfig(
        data=str(tiny_data),
        out=str(tmp_path / "first"),
        vocab_size=300,
        hidden_size=32,
        layers=1,
        heads=2,
        intermediate_size=64,
        epochs=1,
        batch_size=16,
        save_steps=100,
        logging_steps=2,
    )
    init = train_planner(first)
    cfg = PlannerTrainConfig(
        **{**first.__dict__, "out": str(tmp_path / "cont"), "init": str(init), "data_rows": 16, "wide_rows": 32}
    )
    extra = wide_rows(cfg.wide_rows, cfg.wide_seed)
    prompts, plans = training_rows(cfg, load_dataset_dir(tiny_data), extra)
    assert len(prompts) == len(plans) == 48
    assert prompts[16:] == [make_prompt_example(cfg.wide_seed, i)["prompt"] for i in range(32)]
    assert training_rows(cfg, load_dataset_dir(tiny_data), extra) == (prompts, plans)  # the subset is seeded
    final = train_planner(cfg, extra)
    a, b = Planner.from_pretrained(init), Planner.from_pretrained(final)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()  # the init planner's tokenizer, not a new one
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # trained on from the init weights
    assert all(v.dtype == torch.float32 for v in wb.values())


def test_metadata_prompts_score_a_metadata_file(tmp_path):
    prompts, gold, _ = metadata_prompts("toyworld/eval/data/handwritten.jsonl")
    assert len(prompts) == len(gold) >= 45
    right = [PlanResult(p, Plan.parse(g), g, [], "end") for p, g in zip(prompts, gold)]
    assert plan_metrics(right, gold, V.TOY_PLAN_SPEC)["exact_match"] == 1.0
    no_plan = tmp_path / "meta.jsonl"
    no_plan.write_text(json.dumps({"tag": "single_object", "include": [{"class": "star"}], "prompt": "a star"}) + "\n")
    with pytest.raises(ValueError, match="no 'plan'"):
        metadata_prompts(no_plan)


@pytest.mark.parametrize("lora", [False, True])
def test_any_local_causal_lm_becomes_a_planner(tiny_data, tmp_path, lora):
    """A Qwen2 LM without the planning tokens, fine-tuned fully or through LoRA (the new token rows train as peft
    trainable tokens); the result loads as a planner folder or as an adapter over the original LM."""
    raw = save_tiny_llm(tmp_path / "qwen", "qwen2", chat_template=CHAT_TEMPLATE)
    assert "<IMG_BEGIN>" not in AutoTokenizer.from_pretrained(raw).get_vocab()
    cfg = PlannerTrainConfig(
        data=str(tiny_data), out=str(tmp_path / "run"), init=str(raw), epochs=1, batch_size=16, save_steps=100,
        logging_steps=2, lr=5e-3, lora_rank=4 if lora else 0,
    )  # fmt: skip
    final = train_planner(cfg)
    if lora:
        assert (final / "adapter_config.json").is_file()
        planner = Planner.from_pretrained(raw, adapter=final, spec=V.TOY_PLAN_SPEC)
    else:
        planner = Planner.from_pretrained(final, spec=V.TOY_PLAN_SPEC)
    base = AutoModelForCausalLM.from_pretrained(raw).get_input_embeddings().weight
    new = planner.tokenizer.convert_tokens_to_ids("<IMG_BEGIN>")
    rows = planner.model.get_input_embeddings().weight
    assert new >= base.shape[0] and not torch.allclose(rows[new], base.mean(0), atol=1e-6)  # the new row trained
    assert planner.plan(["a red circle"])[0].plan is not None  # constrained decoding: it parses


def test_8bit_training_needs_what_it_needs(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="load_in_8bit needs init"):
        initial_model(PlannerTrainConfig(load_in_8bit=True), None)
    if not torch.cuda.is_available():
        cfg = PlannerTrainConfig(init=str(tmp_path), lora_rank=4, load_in_8bit=True)
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            initial_model(cfg, None)


def test_cli_plans_with_an_adapter_over_a_local_llm(tiny_data, tmp_path, capsys):
    raw = save_tiny_llm(tmp_path / "llama", "llama")
    cfg = PlannerTrainConfig(
        data=str(tiny_data), out=str(tmp_path / "run"), init=str(raw), epochs=1, batch_size=32, save_steps=100,
        lora_rank=2,
    )  # fmt: skip
    adapter = train_planner(cfg)
    assert main(["plan", "a red circle", "--llm", str(raw), "--adapter", str(adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plan"].startswith("<IMG_BEGIN>")


def test_a_reviser_trains_on_extra_rows_alone_and_loads_as_a_second_adapter(tiny_data, tmp_path):
    base = dict(data=str(tiny_data), vocab_size=300, hidden_size=32, layers=1, heads=2, intermediate_size=64,
                epochs=1, batch_size=16, save_steps=50, logging_steps=2)  # fmt: skip
    planner = train_planner(PlannerTrainConfig(out=str(tmp_path / "p"), **base))
    first = train_planner(PlannerTrainConfig(out=str(tmp_path / "a1"), **{**base, "init": str(planner),
                                                                           "lora_rank": 2, "epochs": 1}))  # fmt: skip
    gold = "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 1 object, center <OBJECT> 1 medium red circle at center <COLOR> red <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>"  # noqa: E501
    rows = [(revision_request("a red circle", gold.replace("red", "blue"), None), gold)] * 8
    with pytest.raises(ValueError, match="extra rows alone"):
        train_planner(PlannerTrainConfig(out=str(tmp_path / "x"), **{**base, "data": None}), extra_rows=rows)
    merged = Planner.from_pretrained(planner, adapter=first)
    merged.save_pretrained(tmp_path / "writer")
    cfg = PlannerTrainConfig(out=str(tmp_path / "rev"), **{**base, "data": None, "init": str(tmp_path / "writer"),
                                                           "lora_rank": 2, "epochs": 2})  # fmt: skip
    adapter = train_planner(cfg, extra_rows=rows)
    logs = [json.loads(line) for line in (tmp_path / "rev" / "log.jsonl").read_text().splitlines()]
    assert any("loss" in rec for rec in logs)
    reviser = PlanReviser.from_pretrained(planner, spec=V.TOY_PLAN_SPEC, adapter=[first, adapter])
    out = reviser.revise(["a red circle"], [gold.replace("red", "blue")], ["Score 0.50. object 1 (circle) color."])
    assert out[0].plan is not None and out[0].plan.is_valid(V.TOY_PLAN_SPEC)
    with pytest.raises(Exception, match="adapter"):
        Planner.from_pretrained(planner, adapter=[first, tmp_path / "nothing"])


def test_eval_planner_reports_exact_match_per_sentence_frame():
    module = load_script("eval_planner")
    args = argparse.Namespace(splits=[], metadata=["toyworld/eval/data/shapes_eval_heldout.jsonl"], n=4, seed=0)
    prompts, gold, families = module.prompt_sets(args)["shapes_eval_heldout"]
    assert len(prompts) == len(gold) == len(families) == 800 and "single_like_to_see" in families
    by_group = {"pair_both": {"right": 1, "n": 2, "exact": 0.5}}
    reports = [{"planner": p, "x_constrained": {"exact_match": 0.5, "exact_by_group": by_group}} for p in ("A", "B")]
    assert "| pair_both | 2 | 0.500 | 0.500 |" in module.family_table(reports)
