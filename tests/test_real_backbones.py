"""Bridge training on real backbone classes (tiny random SD 1.x and SDXL folders), from a prepared data set to a
generated image: SD without a CLIP image tower, with a separate HF CLIP for the alignment loss, and SDXL in
replace and concat mode (its pooled text_embeds and time_ids)."""

import json

import numpy as np
import pytest
from PIL import Image
from test_prepared import _prepare_user_data, user_data  # noqa: F401  (the shared Parquet fixture)
from tiny_models import save_tiny_clip_vision, save_tiny_planner, save_tiny_sd, save_tiny_sdxl, tiny_bridge_config

from alignment.bridge_training import BridgeTrainer
from alignment.stages import config_from_dict
from llm_bridge.bridge import LLMBridge
from plan2img.cli import main

A = {"train": ["connector"], "steps": 2, "batch_size": 4, "clip_align_weight": 0.0}
C = {"train": ["connector", "unet_cross_attn"], "steps": 1, "batch_size": 4, "clip_align_weight": 0.0,
     "unet_cross_attn": "lora", "unet_lora_rank": 2}  # fmt: skip


@pytest.fixture(scope="module")
def world(user_data, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("real")
    return {
        "data": _prepare_user_data(user_data, root / "prepared", resolution=16, center_crop=True),
        "sd": save_tiny_sd(root / "sd"),
        "sdxl": save_tiny_sdxl(root / "sdxl"),
        "clip": save_tiny_clip_vision(root / "clip"),
        "planner": save_tiny_planner(root / "llm"),
    }


def _train_and_generate(world, tmp_path, base: str, stages: dict, **overrides):
    run = tmp_path / "run"
    curriculum = list(stages)
    cfg = tiny_bridge_config(world["data"], world[base], world["planner"], run, stages, curriculum=curriculum,
                             **overrides)  # fmt: skip
    BridgeTrainer(config_from_dict(cfg), progress=False).run()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(row["total"]) for row in log)
    bridge = run / f"stage-{''.join(curriculum)}"
    out = tmp_path / "out.png"
    args = ["generate", "a red circle", "-o", str(out), "--model", str(world[base]), "--llm", str(world["planner"])]
    assert main(args + ["--bridge", str(bridge), "--writer", "same", "--steps", "2"]) == 0
    assert Image.open(out).size == (16, 16)
    return LLMBridge.from_pretrained(bridge), log


def test_sd_bridge_trains_without_an_image_tower_and_refuses_the_alignment_loss(world, tmp_path):
    bridge, _ = _train_and_generate(world, tmp_path, "sd", {"A": A})
    assert bridge.config.d_ctx == 32 and bridge.config.d_text_embeds is None
    aligned = {"A": {**A, "clip_align_weight": 0.1}}
    cfg = tiny_bridge_config(world["data"], world["sd"], world["planner"], tmp_path / "r2", aligned)
    with pytest.raises(ValueError, match="no CLIP image tower: set clip_image_model"):
        BridgeTrainer(config_from_dict(cfg), progress=False)


def test_sd_bridge_aligns_to_a_separate_clip_image_model(world, tmp_path):
    _, log = _train_and_generate(
        world, tmp_path, "sd", {"A": {**A, "clip_align_weight": 0.1}}, clip_image_model=str(world["clip"])
    )
    assert all(np.isfinite(row["clip_align"]) for row in log)


@pytest.mark.parametrize("mode", ["replace", "concat"])
def test_sdxl_bridge_trains_and_generates(world, tmp_path, mode):
    bridge, _ = _train_and_generate(world, tmp_path, "sdxl", {"A": A, "C": C}, mode=mode)
    c = bridge.config
    assert c.d_ctx == 64 and c.d_time is None
    if mode == "replace":  # the connector writes SDXL's pooled text_embeds and time ids itself
        assert c.d_text_embeds == 32 and c.time_ids == [16, 16, 0, 0, 16, 16]
    else:  # concat keeps SDXL's own pooled vector
        assert c.d_text_embeds is None and c.time_ids is None
    assert bridge.unet_delta  # stage C's LoRA on the cross-attention
