"""What the bridge reads besides the plan: the plan's caption in the training grammar (`plan_caption`), plans in
reading order (`reading_order_plan`), the pipeline's plan-only reading (`caption=`), and a LoRA adapter as the
plan writer (`Planner.from_pretrained(adapter=...)`)."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from prompt_reader import read_prompt
from tiny_models import save_tiny_planner, save_tiny_toy_base

from alignment.planner_sft import PlannerTrainConfig, lora_config
from diffusion_backbone.models import load_backbone
from llm_bridge.bridge import LLMBridge
from llm_bridge.connector import ConnectorConfig
from llm_bridge.native_layout import NativeLayoutPipeline
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.planner import Planner, PlannerLoadError, is_adapter_dir, load_planner
from planner.schema import Plan, PlanError
from toyworld import vocab as V
from toyworld.data import build_dataset, load_dataset_dir
from toyworld.grammar import caption_draw, plan_caption, reading_order_plan
from toyworld.scene import SceneSpec, sample_spec

RIGHT_FIRST = (
    "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 2 objects, side by side <OBJECT> 1 medium yellow star at right "
    "<OBJECT> 1 small red circle at left <COLOR> yellow, red <MATERIAL> outlined <LIGHTING> dim light "
    "<CAMERA> medium shot <IMG_END>"
)
BELOW_FIRST = RIGHT_FIRST.replace("side by side", "stacked").replace("at right", "at bottom")
BELOW_FIRST = BELOW_FIRST.replace("at left", "at top")


def test_reading_order_puts_left_and_top_first_and_keeps_the_scene():
    for plan, first in ((RIGHT_FIRST, "at left"), (BELOW_FIRST, "at top")):
        ordered = Plan.parse(reading_order_plan(plan), V.TOY_PLAN_SPEC)
        assert ordered.objects[0].endswith(first) and ordered.color == "red, yellow"
        before, after = SceneSpec.from_plan(Plan.parse(plan, V.TOY_PLAN_SPEC)), SceneSpec.from_plan(ordered)
        assert sorted(before.objects, key=str) == sorted(after.objects, key=str)
        assert (before.style, before.lighting, before.camera, before.material) == (
            after.style, after.lighting, after.camera, after.material)  # fmt: skip
        assert reading_order_plan(ordered) == ordered.to_text()  # idempotent


def test_plan_caption_says_the_plan_in_training_frames():
    assert plan_caption(RIGHT_FIRST) == plan_caption(reading_order_plan(RIGHT_FIRST))
    caption = plan_caption(RIGHT_FIRST)
    assert caption.index("circle") < caption.index("left of") < caption.index("star")
    assert "above" in plan_caption(BELOW_FIRST)
    rng = np.random.default_rng(0)
    for _ in range(200):  # every kind of scene: the caption reads back (rule-based) to the reading-order plan
        spec = sample_spec(rng).spec
        plan = spec.to_plan().to_text()
        caption = plan_caption(plan)
        assert caption == plan_caption(plan)  # deterministic
        ordered = reading_order_plan(plan)
        read = read_prompt(caption, caption_draw(plan)[1]).to_plan().to_text()
        assert read == ordered, (plan, caption)


def test_plan_caption_refuses_plans_it_cannot_say():
    with pytest.raises(PlanError):
        plan_caption("<IMG_BEGIN> <OBJECT> a tall tree <IMG_END>")


# ------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading_world")
    build_dataset(root / "data", n=32, seed=5, workers=1, heldout_fraction=0.1, progress=False)
    prompts = list(load_dataset_dir(root / "data")["prompt"])
    return {"base": save_tiny_toy_base(root / "base", prompts), "planner": save_tiny_planner(root / "llama", "llama")}


def _pipe(world, **kwargs):
    planner = Planner.from_pretrained(world["planner"], spec=V.TOY_PLAN_SPEC)
    backbone = load_backbone(world["base"])
    cfg = ConnectorConfig.from_preset("resampler-32q", d_llm=planner.model.config.hidden_size, width=32,
                                      d_ctx=backbone.unet.config.cross_attention_dim,
                                      mode="concat", spatial=True, object_queries=4, init_std=0.5)  # fmt: skip
    torch.manual_seed(0)
    null = backbone.text_encoder.encode([""]).tokens[0]
    return Plan2ImgPipeline(planner, LLMBridge(cfg, null, None), backbone, **kwargs)


def _conditioning(pipe, prompts, plans):
    read, plans = pipe.read_texts(prompts, plans)
    states, native = pipe.plan_states(read, plans)
    return pipe.bridge.conditioning(states, native, region_masks=pipe.region_masks(plans))


def test_reading_the_plan_makes_the_conditioning_depend_on_the_plan_alone(world):
    prompts = ["a circle with a star on its right", "draw them: a star, and left of it a small red circle"]
    plain = _pipe(world)
    by_prompt = _conditioning(plain, prompts, [RIGHT_FIRST] * 2)
    assert not torch.allclose(by_prompt.tokens[0], by_prompt.tokens[1])  # the prompt is in the LLM's context
    pipe = _pipe(world, caption=plan_caption, normalize_plan=reading_order_plan)
    read, plans = pipe.read_texts(prompts, [RIGHT_FIRST] * 2)
    assert read == [plan_caption(RIGHT_FIRST)] * 2 and plans == [reading_order_plan(RIGHT_FIRST)] * 2
    by_plan = _conditioning(pipe, prompts, [RIGHT_FIRST] * 2)
    torch.testing.assert_close(by_plan.tokens[0], by_plan.tokens[1])  # the LLM and the native encoder alike
    first_region = by_plan.regions.masks[0, 0]
    assert first_region[:, :4].sum() > first_region[:, -4:].sum()  # the first group is the left object's
    out = pipe(prompts, seeds=[0, 0], plans=[RIGHT_FIRST] * 2, steps=2)
    assert np.array_equal(out.images[0], out.images[1]) and out.read == read
    free = "<IMG_BEGIN> <OBJECT> a tall tree <IMG_END>"  # a plan the caption cannot say keeps the prompt
    assert pipe.read_texts(["a tree"], [free]) == (["a tree"], [free])
    assert pipe.read_texts(["a tree"], None) == (["a tree"], None)


def test_native_on_the_plan_caption(world):
    backbone = load_backbone(world["base"])
    rewrite = NativeLayoutPipeline(None, backbone, regions=False, caption=plan_caption)
    cond = rewrite.conditioning(["whatever the user typed"], [RIGHT_FIRST])
    torch.testing.assert_close(cond.tokens, backbone.text_encoder.encode([plan_caption(RIGHT_FIRST)]).tokens)
    assert cond.regions is None
    assert rewrite(["x"], [0], plans=[RIGHT_FIRST], steps=2).images.shape == (1, 64, 64, 3)


# ------------------------------------------------------------------------------------------- LoRA writer
def test_a_lora_adapter_writes_plans_merged_into_its_planner(world, tmp_path):
    base = Planner.from_pretrained(world["planner"], spec=V.TOY_PLAN_SPEC)
    cfg = PlannerTrainConfig(init=str(world["planner"]), lora_rank=4)
    peft_model = get_peft_model(base.model, lora_config(cfg))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a trained-looking adapter (lora_B starts at zero: the identity)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert is_adapter_dir(tmp_path / "adapter") and not is_adapter_dir(world["planner"])
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = peft_model(ids).logits
    writer = Planner.from_pretrained(world["planner"], adapter=tmp_path / "adapter", spec=V.TOY_PLAN_SPEC)
    torch.testing.assert_close(writer.model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    plain = Planner.from_pretrained(world["planner"], spec=V.TOY_PLAN_SPEC)
    assert not torch.allclose(plain.model(ids).logits, expected, atol=1e-3)
    with pytest.raises(PlannerLoadError, match="not a peft adapter"):
        Planner.from_pretrained(world["planner"], adapter=world["planner"])
    # load_planner: one call for either kind of folder (the scripts' --writer)
    either = load_planner(tmp_path / "adapter", base=world["planner"], spec=V.TOY_PLAN_SPEC)
    torch.testing.assert_close(either.model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    full = load_planner(world["planner"], base=tmp_path / "missing", spec=V.TOY_PLAN_SPEC)  # base unused
    torch.testing.assert_close(full.model(ids).logits, plain.model(ids).logits)
    with pytest.raises(PlannerLoadError, match="adapter folder: give the planner"):
        load_planner(tmp_path / "adapter", spec=V.TOY_PLAN_SPEC)
    with pytest.raises(ValueError, match="needs init"):
        lora_config(PlannerTrainConfig(lora_rank=4))
    assert lora_config(PlannerTrainConfig()) is None
    assert isinstance(lora_config(cfg), LoraConfig)
