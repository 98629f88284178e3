"""SDXL: our conditioning (native two-encoder and LLM bridge) drives a stock `StableDiffusionXLPipeline` exactly."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from tiny_models import save_tiny_planner, save_tiny_sdxl
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.models import load_backbone
from diffusion_backbone.pipeline import TextToImagePipeline
from diffusion_backbone.sampling import sample
from diffusion_backbone.sdxl import default_time_ids, image_size, text_embeds_dim
from diffusion_backbone.text_encoders import SDXLTextEncoder
from llm_bridge.bridge import BridgeLoadError, LLMBridge
from llm_bridge.connector import ConnectorConfig
from llm_bridge.encoder import PlanEncoder

PROMPTS = ["a red circle", "two blue squares"]
PLAN = "<IMG_BEGIN> <STYLE> plain background <OBJECT> 1 medium red circle at center <IMG_END>"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return load_backbone(save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = save_tiny_planner(tmp_path_factory.mktemp("planner"))
    llm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return PlanEncoder(llm, tok, "mean")


def stock_pipeline(backbone, sampler="ddim"):
    enc = backbone.text_encoder
    pipe = StableDiffusionXLPipeline(
        vae=backbone.vae,
        text_encoder=enc.models[0],
        text_encoder_2=enc.models[1],
        tokenizer=enc.tokenizers[0],
        tokenizer_2=enc.tokenizers[1],
        unet=backbone.unet,
        scheduler=backbone.scheduler(sampler),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_latents(pipe, cond: Conditioning, uncond: Conditioning, seeds, steps=3, guidance=4.0):
    b = cond.batch_size
    uncond = uncond.repeat(b) if uncond.batch_size == 1 else uncond
    return pipe(
        prompt_embeds=cond.to_prompt_embeds(),
        pooled_prompt_embeds=cond.pooled,
        negative_prompt_embeds=uncond.to_prompt_embeds(),
        negative_pooled_prompt_embeds=uncond.pooled,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).images


def our_latents(backbone, cond, uncond, seeds, sampler="ddim", steps=3, guidance=4.0):
    return sample(
        backbone.unet,
        backbone.scheduler(sampler),
        cond,
        uncond,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        progress=False,
    )


def test_sdxl_folder_loads_both_encoders_with_time_ids(sdxl):
    enc = sdxl.text_encoder
    assert isinstance(enc, SDXLTextEncoder)
    assert enc.dim == sdxl.unet.config.cross_attention_dim == 64
    assert enc.pooled_dim == text_embeds_dim(sdxl.unet) == 32
    assert image_size(sdxl.unet, sdxl.vae) == (16, 16)
    cond = enc.encode(PROMPTS)
    assert cond.time_ids.tolist() == [default_time_ids((16, 16))] * 2 == [[16, 16, 0, 0, 16, 16]] * 2
    null = enc.encode_negative([""])  # force_zeros_for_empty_prompt, as the stock pipeline
    assert torch.count_nonzero(null.tokens) == 0 and torch.count_nonzero(null.pooled) == 0


def test_native_sdxl_encoder_matches_the_stock_encode_prompt(sdxl):
    pipe = stock_pipeline(sdxl)
    ref, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    cond, null = sdxl.text_encoder.encode(PROMPTS), sdxl.text_encoder.encode_negative([""])
    torch.testing.assert_close(cond.tokens, ref)
    torch.testing.assert_close(cond.pooled, ref_pooled)
    torch.testing.assert_close(null.repeat(2).tokens, ref_neg)
    torch.testing.assert_close(null.repeat(2).pooled, ref_neg_pooled)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_native_sdxl_parity_with_stock_pipeline(sdxl, sampler):
    cond, null = sdxl.text_encoder.encode(PROMPTS), sdxl.text_encoder.encode_negative([""])
    expected = stock_latents(stock_pipeline(sdxl, sampler), cond, null, (1, 2))
    ours = our_latents(sdxl, cond, null, (1, 2), sampler)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    images = TextToImagePipeline(sdxl)(PROMPTS, [1, 2], steps=2).images  # the native pipeline runs on SDXL
    assert images.shape == (2, 16, 16, 3)


def sdxl_bridge(sdxl, encoder, mode):
    unet = sdxl.unet
    replace = mode == "replace"
    cfg = ConnectorConfig.from_preset(
        "resampler-32q",
        d_llm=encoder.hidden_size,
        d_ctx=unet.config.cross_attention_dim,
        width=32,
        mode=mode,
        d_text_embeds=text_embeds_dim(unet) if replace else None,
        time_ids=default_time_ids(image_size(unet, sdxl.vae)) if replace else None,
    )
    null = sdxl.text_encoder.encode_negative([""])
    bridge = LLMBridge(cfg, torch.randn(32, 64), None)  # as many null tokens as the connector: equal lengths
    torch.nn.init.normal_(bridge.connector.proj.weight, std=0.5)  # visibly non-trivial conditioning
    if replace:
        torch.nn.init.normal_(bridge.connector.pool[2].weight, std=0.5)
    bridge.attach(unet)
    return bridge, null


@pytest.mark.parametrize("mode", ["replace", "concat"])
def test_sdxl_bridge_conditioning_drives_stock_pipeline(sdxl, encoder, mode):
    bridge, native_null = sdxl_bridge(sdxl, encoder, mode)
    with torch.no_grad():
        states = encoder.encode(PROMPTS, [PLAN, PLAN])
        native = sdxl.text_encoder.encode(PROMPTS) if mode == "concat" else None
        cond = bridge.conditioning(states, native)
        null = bridge.null_conditioning(2, native_null)
    assert cond.pooled.shape == (2, 32) and cond.time_ids.shape == (2, 6)
    if mode == "concat":  # native tokens first, SDXL's own pooled vector kept
        torch.testing.assert_close(cond.pooled, native.pooled)
        assert cond.tokens.shape[1] == native.tokens.shape[1] + 32
    expected = stock_latents(stock_pipeline(sdxl), Conditioning(cond.tokens, None, cond.pooled), null, (3, 4))
    ours = our_latents(sdxl, cond, null, (3, 4))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_connectors_that_do_not_fit_sdxl_are_refused(sdxl, encoder):
    unet = sdxl.unet
    no_pooled = LLMBridge(ConnectorConfig.from_preset("linear", d_llm=8, d_ctx=64), torch.zeros(2, 64), None)
    with pytest.raises(BridgeLoadError, match="text_embeds of width 32"):
        no_pooled.attach(unet)
    timed = ConnectorConfig.from_preset("linear", d_llm=8, d_ctx=64, d_time=128)
    with_time = LLMBridge(timed, torch.zeros(2, 64), None)
    with pytest.raises(BridgeLoadError, match="time modulation"):
        with_time.attach(unet)
    cond = Conditioning(torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="pooled text vector and time_ids"):
        our_latents(sdxl, cond, None, (0,), steps=1, guidance=1.0)
