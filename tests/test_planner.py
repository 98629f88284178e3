"""Planner: any HF causal LM writes plans that parse (constrained), tokens, prompts, bad input."""

import pytest
import torch
from tiny_models import save_tiny_llm, tiny_bpe_tokenizer
from transformers import AutoTokenizer

from planner.constrained import Choice, ObjectSentence, PlanConstraint, field_grammars
from planner.planner import MAX_PROMPT_TOKENS, Planner, PlannerLoadError
from planner.schema import IMG_BEGIN, PLANNING_TOKENS, Plan, PlanSpec
from planner.tokens import FEW_SHOT_EXAMPLES, add_planning_tokens, format_prompt
from toyworld import vocab as V

CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def llm_folder(request, tmp_path_factory):
    return save_tiny_llm(tmp_path_factory.mktemp(request.param), request.param)


def test_random_models_write_plans_that_parse(llm_folder):
    planner = Planner.from_pretrained(llm_folder, spec=V.TOY_PLAN_SPEC)
    prompts = ["two blue squares above a red star", "a circle", "three yellow triangles in dim light"]
    for sample in (False, True):
        results = planner.plan(prompts, do_sample=sample, generator=torch.Generator().manual_seed(3))
        for r in results:
            assert r.error is None and r.plan is not None, r.text
            assert Plan.parse(r.plan.to_text(), V.TOY_PLAN_SPEC) == r.plan  # valid under the toy spec
            assert r.stop_reason in ("end", "forced")
            assert r.plan.structured_objects(V.OBJECT_GRAMMAR)


def test_generic_spec_free_text(llm_folder):
    planner = Planner.from_pretrained(llm_folder, spec=PlanSpec(max_field_tokens=6, max_total_tokens=40))
    r = planner.plan(["a cat"], do_sample=True, generator=torch.Generator().manual_seed(0))[0]
    assert r.plan is not None and r.plan.is_valid(planner.spec)
    assert all(planner.count_tokens(t) <= 6 for _, t in r.plan.fields())


def test_seeded_sampling_is_deterministic(llm_folder):
    planner = Planner.from_pretrained(llm_folder, spec=V.TOY_PLAN_SPEC)

    def run(seed):
        return [
            r.text
            for r in planner.plan(
                ["a star", "two circles"], do_sample=True, generator=torch.Generator().manual_seed(seed)
            )
        ]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_unconstrained_output_is_repaired_or_reported(llm_folder):
    planner = Planner.from_pretrained(llm_folder, spec=V.TOY_PLAN_SPEC)
    for r in planner.plan(["a star"], constrained=False, max_new_tokens=12):
        assert (r.plan is not None) != (r.error is not None)  # never silently passed on
        if r.plan is not None and r.fixes:
            assert r.plan.is_valid(planner.spec)
    r = planner.plan(["a star"], constrained=False, max_new_tokens=12, repair=False)[0]
    assert r.plan is None and "plan for prompt #0" in r.error


def test_special_tokens_keep_existing_ids(tmp_path):
    tok = tiny_bpe_tokenizer()
    before = dict(tok.get_vocab())
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    old_rows = model.get_input_embeddings().weight.detach().clone()
    ids = add_planning_tokens(tok, model)
    after = tok.get_vocab()
    assert all(after[t] == i for t, i in before.items())
    assert sorted(ids.values()) == list(range(len(before), len(before) + len(PLANNING_TOKENS)))
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[: len(before)], old_rows)
    torch.testing.assert_close(emb[len(before)], old_rows.mean(0))
    text = "<IMG_BEGIN> <STYLE> plain background <IMG_END>"
    assert tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)[:2] == ["<IMG_BEGIN>", "<STYLE>"]
    assert add_planning_tokens(tok, model) == ids  # idempotent


def test_prompt_format_uses_chat_template_when_present(tmp_path):
    plain = tiny_bpe_tokenizer()
    chat = tiny_bpe_tokenizer(chat_template=CHAT)
    assert format_prompt(plain, "a cat") == "Request: a cat\nPlan:"
    formatted = format_prompt(chat, "a cat")
    assert "<|user|>a cat" in formatted and formatted.endswith("<|assistant|>")


def test_chat_model_plans(tmp_path):
    folder = save_tiny_llm(tmp_path / "chat", "qwen2", chat_template=CHAT)
    planner = Planner.from_pretrained(folder, spec=V.TOY_PLAN_SPEC)
    assert planner.plan(["a red circle"])[0].plan is not None


@pytest.mark.parametrize("bad, words", [("", "empty"), ("   \n\t", "whitespace"), (None, "not a str")])
def test_bad_prompts_raise_clear_errors(llm_folder, bad, words):
    planner = Planner.from_pretrained(llm_folder, spec=V.TOY_PLAN_SPEC)
    with pytest.raises(ValueError, match=words):
        planner.plan(["fine", bad])


def test_huge_prompt_is_truncated_and_reported(llm_folder):
    planner = Planner.from_pretrained(llm_folder, spec=V.TOY_PLAN_SPEC)
    with pytest.raises(ValueError, match="20000 characters"):
        planner.plan(["x" * 20_000])
    r = planner.plan(["red circle " * 360])[0]  # 3,960 characters: allowed, cut to the token limit
    assert r.plan is not None and any(str(MAX_PROMPT_TOKENS) in w for w in r.warnings)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(PlannerLoadError, match="does not exist"):
        Planner.from_pretrained(tmp_path / "nope")


def test_string_grammars():
    c = Choice(frozenset({"plain background", "vignette background"}))
    assert c.is_prefix("plain b") and not c.is_prefix("plaid")
    assert c.is_complete("plain background") and not c.is_complete("plain")
    assert c.shortest_completion("vig") == "nette background"
    o = ObjectSentence(V.OBJECT_GRAMMAR)
    for good in [
        "1",
        "2 small",
        "2 small red circle at left,",
        "1 medium red circle at top",
        "3 star at top left, top",
    ]:
        assert o.is_prefix(good), good
    for bad in ["0", "1 circle red", "1 red small circle", "1 circle at middle", "1 circle at left, right"]:
        assert not o.is_prefix(bad), bad
    assert o.is_complete("1 medium red circle at top left") and o.is_complete("2 star")
    assert not o.is_complete("2 star at left")
    for partial in ["", "3", "3 large", "3 large blue squ", "3 large blue square at left", "1 star at top"]:
        done = partial + o.shortest_completion(partial)
        assert o.is_complete(done), (partial, done)
        V.OBJECT_GRAMMAR.parse(done)


def test_constraint_masks_only_to_valid_continuations():
    tok = tiny_bpe_tokenizer()
    add_planning_tokens(tok)
    spec = V.TOY_PLAN_SPEC
    prompt = tok("Request: x Plan: " + IMG_BEGIN, return_tensors="pt").input_ids
    proc = PlanConstraint(tok, spec, prompt.shape[1], max_new_tokens=100)
    scores = proc(prompt, torch.zeros(1, len(tok)))
    allowed = torch.nonzero(torch.isfinite(scores[0])).flatten().tolist()
    assert tok.convert_ids_to_tokens(allowed) == ["<STYLE>"]  # STYLE is required and comes first
    assert set(field_grammars(spec)) == {"STYLE", "LAYOUT", "OBJECT", "COLOR", "MATERIAL", "LIGHTING", "CAMERA"}


def test_tokenizer_loading_is_local_only(llm_folder):
    tok = AutoTokenizer.from_pretrained(str(llm_folder), local_files_only=True)
    assert tok.eos_token == "</s>"


def test_8bit_loading_plans_on_cpu(tmp_path):
    from tiny_models import save_tiny_planner

    folder = save_tiny_planner(tmp_path, "llama")
    fp32 = Planner.from_pretrained(folder, spec=V.TOY_PLAN_SPEC)
    int8 = Planner.from_pretrained(folder, spec=V.TOY_PLAN_SPEC, load_in_8bit=True, device="cpu")
    assert "8bit" in type(int8.model.model.layers[0].self_attn.q_proj).__name__
    assert int8.model.get_memory_footprint() < fp32.model.get_memory_footprint()
    r = int8.plan(["a red circle"])[0]
    assert r.plan is not None and r.plan.is_valid(int8.spec)
    with pytest.raises(ValueError, match="one of"):
        Planner.from_pretrained(folder, load_in_8bit=True, load_in_4bit=True)


def test_few_shot_examples_are_valid_plans_and_reach_the_prompt(tmp_path):
    for _, plan in FEW_SHOT_EXAMPLES:
        assert Plan.parse(plan).to_text() == plan and Plan.parse(plan, V.TOY_PLAN_SPEC)
    chat = tiny_bpe_tokenizer(chat_template=CHAT)
    plain = tiny_bpe_tokenizer()
    for tok in (chat, plain):
        shots, bare = format_prompt(tok, "a star", few_shot=True), format_prompt(tok, "a star")
        assert shots.endswith(bare[-12:]) and all(p in shots for _, p in FEW_SHOT_EXAMPLES) and "<OBJECT>" not in bare
    planner = Planner.from_pretrained(save_tiny_llm(tmp_path / "q", "qwen2", chat_template=CHAT), few_shot=True)
    assert planner.plan(["a star"])[0].plan is not None
