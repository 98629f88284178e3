"""Plan-grounded spatial injection: region masks from plans, the region attention bias and its invariances
(all-ones mask and strength 0 are the identity, object tokens get no attention outside their region, plans
without positions are unchanged), regions through CFG batching and concat, training and generation with
regions in replace and concat modes, and the native + layout control."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from tiny_models import save_tiny_planner, save_tiny_toy_base, tiny_unet

from alignment.bridge_training import BridgeTrainer
from alignment.stages import config_from_dict
from diffusion_backbone.conditioning import Conditioning, Regions
from diffusion_backbone.injection import RoutedAttnProcessor, install_routing, map_level, region_bias
from diffusion_backbone.models import load_backbone
from diffusion_backbone.sampling import sample, unet_forward
from diffusion_backbone.toy import toy_unet
from llm_bridge.bridge import LLMBridge
from llm_bridge.connector import ConnectorConfig
from llm_bridge.encoder import PlanEncoder
from llm_bridge.layout import RegionGrid, batch_region_masks, object_positions, plan_region_masks
from llm_bridge.native_layout import NativeLayoutPipeline, object_subprompt
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.planner import Planner
from toyworld import vocab as V
from toyworld.data import build_dataset, load_dataset_dir

PAIR = (
    "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 2 objects, side by side <OBJECT> 1 medium blue circle at left "
    "<OBJECT> 1 medium red square at right <COLOR> blue, red <MATERIAL> solid <LIGHTING> normal light "
    "<CAMERA> medium shot <IMG_END>"
)
STACK = (
    "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 2 objects, stacked <OBJECT> 2 small green star at top, bottom "
    "<COLOR> green <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>"
)
UNPLACED = (
    "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 1 object <OBJECT> 1 medium red circle <COLOR> red "
    "<MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>"
)


def unets():
    """An SD-style tiny U-Net (cross-attention at one level) and a toy-shaped one (two levels and the mid block)."""
    return {"sd": tiny_unet(16, 8), "toy": toy_unet(16, 8, (32, 32, 32), 8)}


# ------------------------------------------------------------------------------------------- layout
def test_region_masks_follow_the_plan_positions():
    assert object_positions(PAIR) == [("left",), ("right",)]
    assert object_positions(STACK) == [("top", "bottom")]
    m = plan_region_masks(PAIR, (16, 16))
    assert m.shape == (2, 16, 16) and m.min() >= 0 and m.max() == 1
    assert m[0, :, :8].sum() > 10 * m[0, :, 8:].sum() and m[0, :, 9:].sum() == 0  # left object: the left half
    assert m[1, :, 8:].sum() > 10 * m[1, :, :8].sum() and m[1, :, :7].sum() == 0
    stacked = plan_region_masks(STACK, (16, 16))[0]  # one entry, two instances: the union of two boxes
    assert stacked[:8].sum() > 0 and stacked[8:].sum() > 0 and stacked[:, :3].sum() == 0
    soft = plan_region_masks(PAIR, (16, 16), RegionGrid(softness=0.25))
    assert ((soft > 0) & (soft < 1)).any()  # soft edges
    assert plan_region_masks(UNPLACED, (16, 16)) is None
    assert batch_region_masks([UNPLACED, None], (8, 8)) is None
    batch = batch_region_masks([UNPLACED, PAIR, STACK], (8, 8))
    assert batch.shape == (3, 2, 8, 8) and batch[0].sum() == 0 and batch[2, 1].sum() == 0


def test_object_subprompts_read_like_captions():
    assert object_subprompt("1 medium blue circle at left") == "a medium blue circle"
    assert object_subprompt("2 small green star at top, bottom") == "two small green stars"
    assert object_subprompt("a tall tree at left") == "a tall tree"


# ------------------------------------------------------------------------------------------- the bias
def _layer():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    attn.set_processor(RoutedAttnProcessor("outer"))
    return attn


def _left_half(hw=(4, 4)) -> torch.Tensor:
    m = torch.zeros(1, 1, *hw)
    m[..., : hw[1] // 2] = 1.0
    return m


def test_object_tokens_get_no_attention_outside_their_region():
    attn = _layer()
    x = torch.randn(1, 16, 16)  # a 4x4 map
    glob, obj = torch.randn(1, 3, 8), 50 * torch.randn(1, 2, 8)  # loud object tokens
    ids = torch.tensor([[0, 0, 0, 1, 1]])
    masks = _left_half()
    with_obj = attn(x, torch.cat([glob, obj], 1), regions=(ids, masks, 1.0, None))
    without = attn(x, glob)
    outside = ~masks.flatten().bool()
    torch.testing.assert_close(with_obj[0, outside], without[0, outside], rtol=0, atol=1e-6)
    assert not torch.allclose(with_obj[0, ~outside], without[0, ~outside], atol=1e-3)
    bias = region_bias(ids, masks, 1.0, 0)
    assert bias.shape == (1, 16, 5) and (bias[0, outside][:, 3:] <= -1e4).all() and (bias[..., :3] == 0).all()


def test_all_ones_mask_and_zero_strength_are_the_identity_at_the_layer():
    attn = _layer()
    x, ctx = torch.randn(2, 16, 16), torch.randn(2, 5, 8)
    ids = torch.tensor([[0, 0, 1, 1, 2]] * 2)
    plain = attn(x, ctx)
    ones = attn(x, ctx, regions=(ids, torch.ones(2, 2, 4, 4), 1.0, None))
    zero = attn(x, ctx, regions=(ids, _left_half().expand(2, 2, 4, 4), 0.0, None))
    torch.testing.assert_close(ones, plain)
    torch.testing.assert_close(zero, plain)


@pytest.mark.parametrize("kind", ["sd", "toy"])
def test_all_ones_mask_is_the_identity_through_the_unet(kind):
    unet = unets()[kind]
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 16)
    plain = unet_forward(unet, z, 10, Conditioning(ctx))
    install_routing(unet)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2]] * 2)
    ones = Conditioning(ctx, regions=Regions(ids, torch.ones(2, 2, 8, 8)))
    torch.testing.assert_close(unet_forward(unet, z, 10, ones), plain)
    left = Conditioning(ctx, regions=Regions(ids, _left_half((8, 8)).expand(2, 2, 8, 8).clone()))
    assert not torch.allclose(unet_forward(unet, z, 10, left), plain, atol=1e-4)
    # a level the U-Net has no attention at: nothing is confined anywhere
    off = Conditioning(ctx, regions=Regions(ids, _left_half((8, 8)).expand(2, 2, 8, 8).clone(), levels=(0,)))
    torch.testing.assert_close(unet_forward(unet, z, 10, off), plain)


def test_regions_need_routing_and_sizes_that_divide():
    unet = tiny_unet(16, 8)
    cond = Conditioning(torch.randn(1, 2, 16), regions=Regions(torch.tensor([[0, 1]]), torch.ones(1, 1, 8, 8)))
    with pytest.raises(ValueError, match="install_routing"):
        unet_forward(unet, torch.randn(1, 4, 8, 8), 10, cond)
    assert map_level(16, (8, 8)) == 1 and map_level(64, (8, 8)) == 0
    with pytest.raises(ValueError, match="latent resolution"):
        map_level(9, (8, 8))
    with pytest.raises(ValueError, match="token_region"):
        Conditioning(torch.randn(1, 3, 16), regions=Regions(torch.tensor([[0, 1]]), torch.ones(1, 1, 8, 8)))


def test_regions_survive_cfg_batching_concat_and_indexing():
    ids = torch.tensor([[0, 1, 1, 2]])
    cond = Conditioning(torch.randn(1, 4, 8), regions=Regions(ids, torch.rand(1, 2, 4, 4), 0.5, (1,)))
    null = Conditioning(torch.randn(1, 3, 8))
    both = Conditioning.cat([null, cond])
    assert both.regions.token_region.tolist() == [[0, 0, 0, 0], [0, 1, 1, 2]]
    assert both.regions.masks[0].sum() == 0 and both.regions.strength == 0.5 and both.regions.levels == (1,)
    native = Conditioning(torch.randn(1, 2, 8))
    joined = native.concat_tokens(cond)
    assert joined.regions.token_region.tolist() == [[0, 0, 0, 1, 1, 2]]
    twice = Conditioning(
        torch.randn(1, 2, 8), regions=Regions(torch.tensor([[0, 1]]), torch.rand(1, 1, 4, 4), 0.5, (1,))
    )
    stacked = twice.concat_tokens(cond)
    assert stacked.regions.token_region.tolist() == [[0, 1, 0, 2, 2, 3]] and stacked.regions.num_regions == 3
    assert both.index(slice(1, 2)).regions.token_region.tolist() == [[0, 1, 1, 2]]
    assert cond.repeat(3).regions.masks.shape == (3, 2, 4, 4)


# ------------------------------------------------------------------------------------------- bridge
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("spatial_world")
    build_dataset(root / "data", n=48, seed=3, workers=1, heldout_fraction=0.1, progress=False)
    prompts = list(load_dataset_dir(root / "data")["prompt"])
    return {"data": root / "data", "base": save_tiny_toy_base(root / "base", prompts),
            "planner": save_tiny_planner(root / "llama", "llama")}  # fmt: skip


def _encoder(world):
    planner = Planner.from_pretrained(world["planner"], spec=V.TOY_PLAN_SPEC)
    return planner, PlanEncoder(planner.model, planner.tokenizer, "mean")


@pytest.mark.parametrize("kind", ["resampler-32q", "mlp"])
def test_plans_without_positions_are_unchanged(world, kind):
    _, encoder = _encoder(world)
    states = encoder.encode(["a circle", "two things"], [UNPLACED, PAIR])
    assert states.object_ids[1].max() == 2 and states.object_ids[0].max() == 1
    cfg = ConnectorConfig.from_preset(kind, d_llm=encoder.hidden_size, d_ctx=16, width=32, spatial=True,
                                      object_queries=4)  # fmt: skip
    bridge = LLMBridge(cfg, torch.zeros(3, 16), None).eval()
    masks = batch_region_masks([UNPLACED, PAIR], (8, 8))
    plain = bridge.conditioning(states)
    spatial = bridge.conditioning(states, region_masks=masks)
    assert plain.regions is None and spatial.regions is not None
    assert bridge.conditioning(states.index(slice(0, 1)), region_masks=None).regions is None
    unet = toy_unet(16, 8, (32, 32, 32), 8)
    install_routing(unet)
    z = torch.randn(2, 4, 8, 8)
    # row 0 places nothing: its U-Net output is today's, though it shares a batch with a placed row
    torch.testing.assert_close(unet_forward(unet, z, 10, spatial)[0], unet_forward(unet, z, 10, plain)[0],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert not torch.allclose(unet_forward(unet, z, 10, spatial)[1], unet_forward(unet, z, 10, plain)[1], atol=1e-4)
    if kind.startswith("resampler"):
        assert spatial.tokens.shape[1] == plain.tokens.shape[1] + 2 * 4
        assert spatial.regions.token_region[1].tolist() == [0] * 32 + [1] * 4 + [2] * 4
        assert not spatial.mask[0, 32:].any() and spatial.mask[1, 32:].all()
        bridge.set_spatial(object_tokens="shared")
        shared = bridge.conditioning(states, region_masks=masks)
        assert not torch.allclose(shared.tokens[1, 32:], spatial.tokens[1, 32:])
    with pytest.raises(ValueError, match="unknown spatial setting"):
        bridge.set_spatial(strength=2)
    with pytest.raises(ValueError, match="region_strength"):
        bridge.set_spatial(region_strength=2.0)


def _spatial_cfg(world, tmp_path, mode, **kw):
    return config_from_dict(
        {
            "data": str(world["data"]),
            "base": str(world["base"]),
            "planner": str(world["planner"]),
            "out": str(tmp_path / mode),
            "connector": "resampler-32q",
            "mode": mode,
            "spatial": True,
            "object_queries": 4,
            "mixed_precision": "no",
            "stages": {
                "A": {"train": ["connector"], "steps": 2, "batch_size": 4},
                "C": {
                    "train": ["connector", "unet_cross_attn"],
                    "steps": 2,
                    "batch_size": 4,
                    "unet_cross_attn": "lora",
                    "unet_lora_rank": 2,
                    "unet_lr": 1e-3,
                },
            },  # fmt: skip
            **kw,
        }
    )


@pytest.mark.parametrize("mode", ["replace", "concat"])
def test_spatial_bridge_trains_and_generates_with_regions(world, tmp_path, mode):
    trainer = BridgeTrainer(_spatial_cfg(world, tmp_path, mode), progress=False)
    masks = trainer.region_masks(trainer.data.plans[:4])
    assert masks is not None and masks.shape[-2:] == (16, 16)
    seen = []
    unet = trainer.backbone.unet
    hook = (
        unet.down_blocks[1]
        .attentions[0]
        .transformer_blocks[0]
        .attn2.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("regions") is not None), with_kwargs=True)
    )
    final = trainer.run()[-1]
    hook.remove()
    assert seen and all(seen)  # every training forward confined object tokens
    bridge = LLMBridge.from_pretrained(final)
    assert bridge.config.spatial and bridge.config.mode == mode and bridge.unet_delta
    pipe = Plan2ImgPipeline.from_pretrained(world["planner"], final, world["base"], spec=V.TOY_PLAN_SPEC)
    out = pipe(["a blue circle left of a red square"] * 2, seeds=[0, 1], plans=[PAIR, UNPLACED], steps=2)
    assert out.images.shape == (2, 64, 64, 3)
    again = pipe(["a blue circle left of a red square"] * 2, seeds=[0, 1], plans=[PAIR, UNPLACED], steps=2)
    assert np.array_equal(out.images, again.images)


def test_training_free_regions_on_a_bridge_trained_without_them(world, tmp_path):
    cfg = _spatial_cfg(world, tmp_path, "replace", spatial=False)
    final = BridgeTrainer(cfg, progress=False).run()[-1]
    pipe = Plan2ImgPipeline.from_pretrained(world["planner"], final, world["base"], spec=V.TOY_PLAN_SPEC)
    kw = dict(seeds=[0], plans=[PAIR], steps=2)
    off = pipe(["x"], **kw).images
    pipe.set_spatial(spatial=True, object_queries=8, region_levels=[1])
    on = pipe(["x"], **kw).images
    assert not np.array_equal(off, on)
    pipe.set_spatial(spatial=False)
    assert np.array_equal(pipe(["x"], **kw).images, off)


def test_a_separate_writer_writes_the_plans_and_the_bridge_llm_reads_them(world, tmp_path):
    final = BridgeTrainer(_spatial_cfg(world, tmp_path, "replace", spatial=False), progress=False).run()[-1]
    reader = Planner.from_pretrained(world["planner"], spec=V.TOY_PLAN_SPEC)
    writer = Planner.from_pretrained(save_tiny_planner(tmp_path / "qwen2", "qwen2"), spec=V.TOY_PLAN_SPEC)
    pipe = Plan2ImgPipeline(reader, LLMBridge.from_pretrained(final), load_backbone(world["base"]), writer=writer)
    prompts = ["a red circle", "two stars"]
    out = pipe(prompts, seeds=[0, 1], steps=2)
    assert [r.plan for r in out.plans] == [r.plan for r in writer.plan(prompts)]
    assert pipe.encoder.model is reader.model


def test_native_layout_confines_subprompts_and_generates(world):
    backbone = load_backbone(world["base"])
    pipe = NativeLayoutPipeline(None, backbone, levels=(1,))
    cond = pipe.conditioning(["a blue circle left of a red square", "a circle"], [PAIR, UNPLACED])
    t = backbone.text_encoder.encode(["x"]).tokens.shape[1]
    ids = cond.regions.token_region
    assert ids.shape == cond.tokens.shape[:2] and (ids[:, :t] == 0).all() and set(ids[0, t:].tolist()) == {1, 2}
    assert not cond.mask[1, t:].any()  # the unplaced row has no region tokens
    latents = sample(backbone.unet, backbone.scheduler("ddim"), cond, pipe.unconditional(), num_inference_steps=2,
                     progress=False)  # fmt: skip
    assert torch.isfinite(latents).all()
    out = pipe(["a blue circle left of a red square"], [0], plans=[PAIR], steps=2)
    assert out.images.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="plans"):
        pipe(["x"], [0], steps=2)
