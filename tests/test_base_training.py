"""Base-model trainers on a tiny data set: exact resume, NaN stop, and the whole chain to a generated image."""

import json

import numpy as np
import pytest
import torch

from alignment.base.clip import CLIPTrainConfig, build_word_tokenizer, train_clip
from alignment.base.unet import UNetTrainConfig, train_unet
from alignment.base.vae import VAETrainConfig, train_vae
from alignment.loop import check_finite
from diffusion_backbone.models import load_backbone
from diffusion_backbone.pipeline import TextToImagePipeline
from plan2img.cli import main
from toyworld.data import build_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ds"
    build_dataset(path, n=48, seed=0, workers=1, heldout_fraction=0.2, progress=False)
    return path


def _losses(log):
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_vae_resume_gives_the_same_loss_sequence(tiny_data, tmp_path):
    common = dict(
        data=str(tiny_data),
        block_out_channels=(16, 16),
        batch_size=4,
        max_steps=6,
        log_every=1,
        checkpoint_every=100,
        scale_samples=8,
        warmup=2,
    )
    train_vae(VAETrainConfig(out=str(tmp_path / "a"), **common), progress=False)
    train_vae(VAETrainConfig(out=str(tmp_path / "b"), stop_at=3, **common), progress=False)
    assert not (tmp_path / "b" / "final").exists()  # stopped on purpose: nothing exported yet
    train_vae(VAETrainConfig(out=str(tmp_path / "b"), **common), progress=False)
    a, b = _losses(tmp_path / "a" / "log.jsonl"), _losses(tmp_path / "b" / "log.jsonl")
    assert len(a) == 6 and a == b


def test_nan_loss_stops_with_the_step_named():
    with pytest.raises(FloatingPointError, match="at step 17"):
        check_finite(torch.tensor(float("nan")), 17)


def test_word_tokenizer_appends_eos_and_lowercases():
    tok = build_word_tokenizer(["A red circle", "two stars, nothing else"], max_length=8)
    ids = tok(["a RED circle"]).input_ids[0]
    assert ids[-1] == tok.eos_token_id == 2 and tok.pad_token_id == 0
    assert tok.convert_ids_to_tokens(ids[:-1]) == ["a", "red", "circle"]
    assert tok(["zebra"]).input_ids[0][0] == tok.unk_token_id


def test_chain_vae_clip_unet_to_image(tiny_data, tmp_path):
    vae_final = train_vae(
        VAETrainConfig(
            data=str(tiny_data),
            out=str(tmp_path / "vae"),
            block_out_channels=(16, 16),
            batch_size=4,
            max_steps=2,
            scale_samples=8,
        ),
        progress=False,
    )
    clip_final = train_clip(
        CLIPTrainConfig(data=str(tiny_data), out=str(tmp_path / "clip"), batch_size=8, max_steps=2), progress=False
    )
    base = train_unet(
        UNetTrainConfig(
            data=str(tiny_data),
            vae=str(vae_final),
            clip=str(clip_final),
            out=str(tmp_path / "unet"),
            block_out_channels=(32, 32),
            attention_head_dim=8,
            batch_size=4,
            max_steps=2,
        ),
        progress=False,
    )
    backbone = load_backbone(base)
    assert backbone.unet.config.cross_attention_dim == backbone.text_encoder.dim
    out = TextToImagePipeline(backbone)(["a red circle"], [0], steps=2)
    assert out.images.shape == (1, 64, 64, 3) and out.images.dtype == np.uint8
    again = TextToImagePipeline(backbone)(["a red circle"], [0], steps=2)
    assert np.array_equal(out.images, again.images)
    png = tmp_path / "x.png"
    assert main(["generate", "--native", "a red circle", "--model", str(base), "--steps", "2", "-o", str(png)]) == 0
    assert png.stat().st_size > 100
    out_dir = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--generate",
                "native",
                "--model",
                str(base),
                "--steps",
                "2",
                "--limit-per-task",
                "1",
                "--n-per-prompt",
                "1",
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    assert json.loads((out_dir / "summary.json").read_text())["n_images"] == 10
    assert (
        main(
            [
                "eval",
                "--ground-truth",
                "--degrade",
                "vae",
                "--model",
                str(base),
                "--limit-per-task",
                "1",
                "--n-per-prompt",
                "1",
                "--out",
                str(tmp_path / "ceiling"),
            ]
        )
        == 0
    )


def test_generate_rejects_empty_prompt(capsys):
    assert main(["generate", "--native", "   "]) == 2
    assert "empty" in capsys.readouterr().err
