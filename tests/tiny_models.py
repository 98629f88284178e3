"""Tiny random components of the real classes (diffusers-test style), saved to folders for loader tests; and
`load_script`, a file of scripts/ as a module for testing its functions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel


def tiny_unet(cross_attention_dim: int = 32, sample_size: int = 8) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )


def tiny_scheduler() -> DDIMScheduler:
    """Stable Diffusion's noise schedule (scaled linear betas) as a DDIM sampler."""
    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_clip_tokenizer(folder: Path):
    """A CLIPTokenizer over lowercase letters (byte-level BPE with no merges), written to ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16, pad_token="<|endoftext|>"
    )


def tiny_clip_text_model(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=16,
    )
    return CLIPTextModel(cfg).eval()


def save_tiny_sd(folder: Path) -> Path:
    """A Stable-Diffusion-shaped folder of tiny random components (safetensors)."""
    tok = tiny_clip_tokenizer(folder / "tokenizer")
    tok.save_pretrained(str(folder / "tokenizer"))
    tiny_clip_text_model(len(tok)).save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    tiny_unet().save_pretrained(str(folder / "unet"), safe_serialization=True)
    tiny_vae().save_pretrained(str(folder / "vae"), safe_serialization=True)
    tiny_scheduler().save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


TINY_CORPUS = [
    "a red circle on the left and two blue squares above a green star",
    "three yellow triangles, close-up, in dim light, outlined, plain background",
    "1 medium red circle at center, top left, bottom right, vertical gradient background",
    "Request: Plan: the quick brown fox jumps over the lazy dog 0 1 2 3 4",
]


def tiny_bpe_tokenizer(vocab_size: int = 300, chat_template: str | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on a few sentences (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def save_tiny_llm(folder: Path, arch: str, chat_template: str | None = None) -> Path:
    """A tiny random causal LM of ``arch`` (llama, qwen2, gpt2) with a tiny tokenizer, as safetensors."""
    import transformers

    tok = tiny_bpe_tokenizer(chat_template=chat_template)
    n = len(tok)
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=n,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def save_tiny_toy_base(folder: Path, prompts: list[str]) -> Path:
    """A toy-world-shaped base (f=4 VAE, open_clip text encoder, 16x16 U-Net), random weights, no training."""
    from alignment.base.clip import build_word_tokenizer
    from alignment.base.unet import SCHEDULER_CONFIG
    from diffusion_backbone.models import Backbone, save_backbone
    from diffusion_backbone.text_encoders import OpenCLIPTextEncoder
    from diffusion_backbone.toy import toy_clip_config, toy_unet, toy_vae

    torch.manual_seed(0)
    cfg = toy_clip_config()
    tok = build_word_tokenizer(prompts + [""], cfg["text_cfg"]["context_length"])
    enc = OpenCLIPTextEncoder.create(cfg, tok)
    vae = toy_vae((16, 16, 16))
    unet = toy_unet(enc.dim, 16, (32, 32), 8)
    return save_backbone(Backbone(unet, vae, dict(SCHEDULER_CONFIG), enc), folder)


def save_tiny_planner(folder: Path, arch: str = "llama") -> Path:
    """A tiny random causal LM with the planning tokens added."""
    from planner.planner import Planner

    save_tiny_llm(folder / "raw", arch)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder / "raw"), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(folder / "raw"), local_files_only=True)
    return Planner(model, tok).save_pretrained(folder / "planner")


def tiny_bridge_config(data, base, planner, out, stages: dict, **overrides) -> dict:
    """A bridge training config on tiny models, as a dict (for `config_from_dict` or a JSON file): a small
    resampler, a log line per step, no mid-stage checkpoints, fp32; ``overrides`` replace any key."""
    return {
        "data": str(data),
        "base": str(base),
        "planner": str(planner),
        "out": str(out),
        "connector": "resampler-32q",
        "log_every": 1,
        "checkpoint_every": 100,
        "mixed_precision": "no",
        "stages": stages,
        **overrides,
    }


def tiny_sdxl_unet(sample_size: int = 8) -> UNet2DConditionModel:
    """A tiny SDXL-shaped U-Net (diffusers' SDXL test config): text_time added conditioning, linear projections,
    cross-attention width 64 (two 32-wide text encoders), 32-wide pooled text_embeds."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 32 (text_embeds) + 6 * 8 (time ids)
        cross_attention_dim=64,
        norm_num_groups=8,
    )


def save_tiny_sdxl(folder: Path) -> Path:
    """An SDXL-shaped folder of tiny random components (two text encoders, safetensors)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = tiny_clip_tokenizer(folder / "tokenizer")
    tok.save_pretrained(str(folder / "tokenizer"))
    tok.save_pretrained(str(folder / "tokenizer_2"))
    tiny_clip_text_model(len(tok)).save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    torch.manual_seed(1)
    cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tok),
        max_position_embeddings=16,
        projection_dim=32,
    )
    CLIPTextModelWithProjection(cfg).eval().save_pretrained(str(folder / "text_encoder_2"), safe_serialization=True)
    tiny_sdxl_unet().save_pretrained(str(folder / "unet"), safe_serialization=True)
    tiny_vae().save_pretrained(str(folder / "vae"), safe_serialization=True)
    tiny_scheduler().save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_tiny_clip_vision(folder: Path, image_size: int = 16) -> Path:
    """A tiny HF CLIP image tower with projection and its image processor (the alignment targets for SD/SDXL)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=1,
        image_size=image_size,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(cfg).save_pretrained(str(folder), safe_serialization=True)
    size = {"shortest_edge": image_size}
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(str(folder))
    return folder


def load_script(name: str):
    """scripts/NAME.py as a module, for testing its functions."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
