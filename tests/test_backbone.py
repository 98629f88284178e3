"""diffusion_backbone: parity with stock diffusers, determinism, CFG, safe loading, bad input."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny_models import save_tiny_sd

from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.models import BackboneLoadError, load_backbone
from diffusion_backbone.sampling import (
    classifier_free_guidance,
    decode_latents,
    encode_images,
    predict_noise,
    sample,
)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def backbone(sd_folder):
    return load_backbone(sd_folder)


@pytest.mark.parametrize("sampler", ["ddim", "euler-a", "dpm++2m"])
def test_parity_with_stock_stable_diffusion_pipeline(sd_folder, backbone, sampler):
    enc = backbone.text_encoder
    cond = enc.encode(["a red circle", "two blue squares"])
    uncond = enc.encode([""])
    pipe = StableDiffusionPipeline(
        vae=backbone.vae,
        text_encoder=enc.model,
        tokenizer=enc.tokenizer,
        unet=backbone.unet,
        scheduler=backbone.scheduler(sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # our text encoder gives the pipeline's own prompt embeddings
    ref_embeds, _ = pipe.encode_prompt(["a red circle", "two blue squares"], "cpu", 1, False)
    torch.testing.assert_close(cond.tokens, ref_embeds)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    expected = pipe(
        prompt_embeds=cond.to_prompt_embeds(),
        negative_prompt_embeds=uncond.repeat(2).to_prompt_embeds(),
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=gens,
        output_type="latent",
    ).images
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    ours = sample(
        backbone.unet,
        backbone.scheduler(sampler),
        cond,
        uncond,
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=gens,
        progress=False,
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_determinism_and_batch_independence(backbone):
    cond = backbone.text_encoder.encode(["abc", "xyz"])
    uncond = backbone.text_encoder.encode([""])

    def run(seeds, c):
        return sample(
            backbone.unet,
            backbone.scheduler("euler-a"),
            c,
            uncond,
            num_inference_steps=3,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            progress=False,
        )

    a, b = run([5, 6], cond), run([5, 6], cond)
    assert torch.equal(a, b)
    single = run([6], cond.index(slice(1, 2)))
    torch.testing.assert_close(single[0], a[1], atol=1e-5, rtol=1e-4)  # image 2 does not depend on image 1
    assert not torch.allclose(run([7, 6], cond)[0], a[0])


def test_guidance_one_is_the_conditional_prediction(backbone):
    cond = backbone.text_encoder.encode(["abc"])
    uncond = backbone.text_encoder.encode([""])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = backbone.unet
    plain = unet(z, 10, encoder_hidden_states=cond.tokens).sample
    torch.testing.assert_close(predict_noise(unet, z, 10, cond, uncond, 1.0), plain)
    torch.testing.assert_close(predict_noise(unet, z, 10, cond, None, 7.5), plain)
    guided = predict_noise(unet, z, 10, cond, uncond, 3.0)
    eps_u = unet(z, 10, encoder_hidden_states=uncond.tokens).sample
    torch.testing.assert_close(guided, classifier_free_guidance(plain, eps_u, 3.0), atol=1e-5, rtol=1e-4)


def test_vae_round_trip_shapes(backbone):
    images = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    z = encode_images(backbone.vae, images)
    assert z.shape == (2, 4, 8, 8)
    out = decode_latents(backbone.vae, z)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8


def test_pickled_weights_are_refused(sd_folder, tmp_path):
    folder = shutil.copytree(sd_folder, tmp_path / "sd")
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    st.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BackboneLoadError, match="only pickled weights"):
        load_backbone(folder)


def test_missing_and_corrupt_weights(sd_folder, tmp_path):
    folder = shutil.copytree(sd_folder, tmp_path / "sd")
    with pytest.raises(BackboneLoadError, match="does not exist"):
        load_backbone(tmp_path / "nowhere")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = vae_file.read_bytes()
    vae_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(BackboneLoadError, match="corrupt or truncated") as info:
        load_backbone(folder)
    assert str(vae_file) in str(info.value)
    vae_file.unlink()
    with pytest.raises(BackboneLoadError, match="no .safetensors"):
        load_backbone(folder)


def test_bad_latents_and_conditioning_raise(backbone):
    cond = backbone.text_encoder.encode(["abc"])
    sched = backbone.scheduler("ddim")
    with pytest.raises(ValueError, match="latents have shape"):
        sample(backbone.unet, sched, cond, latents=torch.zeros(1, 4, 16, 16), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        sample(backbone.unet, sched, cond, latents=torch.full((1, 4, 8, 8), float("nan")), progress=False)
    bad = Conditioning(torch.zeros(1, 5, 7))
    with pytest.raises(ValueError, match="width 7"):
        sample(backbone.unet, sched, bad, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        decode_latents(backbone.vae, torch.full((1, 4, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="bool tensor"):
        Conditioning(torch.zeros(1, 5, 7), mask=torch.ones(1, 4))


def test_conditioning_cat_pads_and_masks():
    a = Conditioning(torch.ones(1, 3, 4))
    b = Conditioning(torch.ones(2, 5, 4), torch.ones(2, 5, dtype=torch.bool))
    c = Conditioning.cat([a, b])
    assert c.tokens.shape == (3, 5, 4) and c.mask[0].tolist() == [True] * 3 + [False] * 2
    assert torch.equal(c.to_prompt_embeds()[0, 3:], torch.zeros(2, 4))
    assert c.repeat(2).batch_size == 6


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_sdedit_matches_stock_img2img_and_a_keep_mask_keeps_the_init(backbone, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    enc = backbone.text_encoder
    cond, uncond = enc.encode(["a red circle"]), enc.encode([""])
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    pipe = StableDiffusionImg2ImgPipeline(
        vae=backbone.vae, text_encoder=enc.model, tokenizer=enc.tokenizer, unet=backbone.unet,
        scheduler=backbone.scheduler(sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        image=init, strength=0.6, prompt_embeds=cond.tokens, negative_prompt_embeds=uncond.tokens,
        num_inference_steps=5, guidance_scale=4.0, generator=torch.Generator().manual_seed(3), output_type="latent",
    ).images  # fmt: skip
    kwargs = dict(num_inference_steps=5, guidance_scale=4.0, progress=False, init_latents=init, strength=0.6)
    ours = sample(backbone.unet, backbone.scheduler(sampler), cond, uncond,
                  generator=torch.Generator().manual_seed(3), **kwargs)  # fmt: skip
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4] = 1.0  # keep the left half of the init
    edited = sample(backbone.unet, backbone.scheduler(sampler), cond, uncond,
                    generator=torch.Generator().manual_seed(4), keep_mask=keep, **kwargs)  # fmt: skip
    torch.testing.assert_close(edited[..., :4], init[..., :4])
    assert not torch.allclose(edited[..., 4:], init[..., 4:], atol=1e-2)
    with pytest.raises(ValueError, match="need init_latents"):
        sample(backbone.unet, backbone.scheduler(sampler), cond, uncond, strength=0.5, progress=False)
