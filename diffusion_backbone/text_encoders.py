"""Native text encoders behind one small interface: prompts -> `Conditioning` (token states + pooled).

- `HFCLIPTextEncoder`: Hugging Face ``CLIPTextModel`` + ``CLIPTokenizer``, what Stable Diffusion folders hold.
  Tokens are the last hidden state over the padded 77 positions, exactly what SD's pipeline feeds the U-Net.
- `SDXLTextEncoder`: SDXL's two encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``), exactly as
  ``StableDiffusionXLPipeline.encode_prompt``: the penultimate hidden states of both, concatenated along the
  width, and the second encoder's projected pooled output as ``pooled``; ``time_ids`` for the U-Net's sample
  size.
- `OpenCLIPTextEncoder`: an open_clip model's text tower (``output_tokens``) with a Hugging Face tokenizer;
  the toy world's CLIP. Tokens are the final-LayerNorm states; padding is masked.

Folder layout: ``FOLDER/text_encoder`` + ``FOLDER/tokenizer`` (SDXL: also ``text_encoder_2`` + ``tokenizer_2``).
An open_clip encoder stores ``open_clip_config.json`` (``{"model_cfg": ..., "model_name": ...}``) and
``open_clip_model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.sdxl import default_time_ids, with_time_ids

CONFIG_DIR = Path(__file__).parent / "configs"


def register_open_clip_configs() -> None:
    """Register plan2img's open_clip model configs (``plan2img-toy-clip``) with open_clip."""
    import open_clip

    if "plan2img-toy-clip" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


class TextEncoder:
    """Interface: ``encode(prompts) -> Conditioning``; ``dim`` (token width), ``pooled_dim``."""

    dim: int
    pooled_dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> Conditioning:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_negative(self, prompts: list[str]) -> Conditioning:
        """The conditioning of negative prompts (CFG's unconditional branch); the same as `encode` unless the
        model zeroes empty negative prompts (SDXL's ``force_zeros_for_empty_prompt``)."""
        return self.encode(prompts)

    def to(self, device=None, dtype=None) -> TextEncoder:  # pragma: no cover - interface
        raise NotImplementedError

    def freeze(self) -> TextEncoder:  # pragma: no cover - interface
        raise NotImplementedError

    def save(self, folder: Path, dtype: torch.dtype | None = None) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _check_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt #{i} is a {type(p).__name__}, not a str")
    return list(prompts)


class HFCLIPTextEncoder(TextEncoder):
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.dim = model.config.hidden_size
        self.pooled_dim = model.config.hidden_size
        self.max_length = tokenizer.model_max_length

    @classmethod
    def from_folder(cls, root: Path, dtype: torch.dtype = torch.float32) -> HFCLIPTextEncoder:
        from transformers import CLIPTextModel, CLIPTokenizer

        from diffusion_backbone.models import BackboneLoadError, check_weights_folder

        check_weights_folder(root / "text_encoder", "text encoder")
        try:
            model = CLIPTextModel.from_pretrained(
                str(root / "text_encoder"), torch_dtype=dtype, use_safetensors=True, local_files_only=True
            )
            tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        except Exception as err:
            raise BackboneLoadError(f"text encoder: could not load from {root}: {err}") from None
        return cls(model, tokenizer)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        prompts = _check_prompts(prompts)
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.model.device)
        out = self.model(ids)
        return Conditioning(out.last_hidden_state, None, out.pooler_output)

    def to(self, device=None, dtype=None) -> HFCLIPTextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> HFCLIPTextEncoder:
        self.model.requires_grad_(False).eval()
        return self

    def save(self, folder: Path, dtype: torch.dtype | None = None) -> None:
        state = None  # a cast copy of the weights: casting the model itself would change the live encoder
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.model.state_dict().items()}
        self.model.save_pretrained(str(Path(folder) / "text_encoder"), state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(str(Path(folder) / "tokenizer"))


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip ``CustomTextCLIP`` with a Hugging Face tokenizer."""

    def __init__(self, model, tokenizer, model_cfg: dict, model_name: str = "plan2img-toy-clip"):
        self.model = model  # the whole CLIP: the image tower is kept for alignment targets and retrieval
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.model_name = model_name
        text_cfg = model_cfg["text_cfg"]
        self.dim = text_cfg["width"]
        self.pooled_dim = model_cfg["embed_dim"]
        self.max_length = text_cfg["context_length"]
        self.model.text.output_tokens = True

    @classmethod
    def create(cls, model_cfg: dict, tokenizer, model_name: str = "plan2img-toy-clip") -> OpenCLIPTextEncoder:
        """A randomly initialised open_clip model of ``model_cfg`` (for training)."""
        from open_clip.model import CustomTextCLIP

        model_cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
        model = CustomTextCLIP(**model_cfg)
        return cls(model, tokenizer, model_cfg, model_name)

    @classmethod
    def from_folder(cls, root: Path, dtype: torch.dtype = torch.float32) -> OpenCLIPTextEncoder:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        from diffusion_backbone.models import BackboneLoadError, check_weights_folder

        folder = root / "text_encoder"
        weights = check_weights_folder(folder, "text encoder")
        try:
            meta = json.loads((folder / "open_clip_config.json").read_text())
            tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
            enc = cls.create(meta["model_cfg"], tokenizer, meta.get("model_name", "plan2img-toy-clip"))
            missing, unexpected = enc.model.load_state_dict(load_file(str(weights)), strict=False)
        except Exception as err:
            raise BackboneLoadError(f"text encoder: could not load open_clip model from {folder}: {err}") from None
        if missing or unexpected:
            raise BackboneLoadError(
                f"text encoder: {weights} does not match its config (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        return enc.to(dtype=dtype)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        eos = self.tokenizer.eos_token_id
        ids[:, -1] = torch.where((ids == eos).any(1), ids[:, -1], torch.full_like(ids[:, -1], eos))
        return ids

    def forward_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled after projection (B, embed_dim), token states (B, T, width)) with gradients."""
        pooled, tokens = self.model.text(ids.to(self.device))
        return pooled, tokens

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        ids = self.tokenize(prompts)
        pooled, tokens = self.forward_text(ids)
        mask = self.attention_mask(ids).to(tokens.device)
        return Conditioning(tokens, mask, pooled)

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True up to and including the first end-of-text token (causal states after it are padding)."""
        eos = self.tokenizer.eos_token_id
        first_eos = (ids == eos).int().argmax(dim=1)
        return torch.arange(ids.shape[1])[None, :] <= first_eos[:, None]

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, embed_dim), unnormalised; ``images`` (B, 3, H, W) in [-1, 1]."""
        return self.model.encode_image(images.to(self.device, self.dtype))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> OpenCLIPTextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> OpenCLIPTextEncoder:
        self.model.requires_grad_(False).eval()
        return self

    def save(self, folder: Path, dtype: torch.dtype | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(folder) / "text_encoder"
        out.mkdir(parents=True, exist_ok=True)
        state = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in self.model.state_dict().items()
        }
        save_file(state, str(out / "open_clip_model.safetensors"))
        (out / "open_clip_config.json").write_text(
            json.dumps({"model_name": self.model_name, "model_cfg": self.model_cfg}, indent=2) + "\n"
        )
        self.tokenizer.save_pretrained(str(Path(folder) / "tokenizer"))


class SDXLTextEncoder(TextEncoder):
    """SDXL's two text encoders; see the module docstring. ``image_size`` (height, width) sets the ``time_ids``
    of every conditioning (`load_backbone` sets it from the U-Net and VAE); None leaves them out."""

    def __init__(self, model, tokenizer, model_2, tokenizer_2, *, image_size: tuple[int, int] | None = None,
                 force_zeros_for_empty_prompt: bool = True):  # fmt: skip
        self.models = [model, model_2]
        self.tokenizers = [tokenizer, tokenizer_2]
        self.dim = model.config.hidden_size + model_2.config.hidden_size
        self.pooled_dim = model_2.config.projection_dim
        self.max_length = min(tokenizer.model_max_length, tokenizer_2.model_max_length)
        self.image_size = image_size
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def from_folder(cls, root: Path, dtype: torch.dtype = torch.float32) -> SDXLTextEncoder:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from diffusion_backbone.models import BackboneLoadError, check_weights_folder

        parts = []
        for suffix, model_cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
            check_weights_folder(root / f"text_encoder{suffix}", f"text encoder{suffix}")
            try:
                model = model_cls.from_pretrained(
                    str(root / f"text_encoder{suffix}"), torch_dtype=dtype, use_safetensors=True, local_files_only=True
                )
                tok = CLIPTokenizer.from_pretrained(str(root / f"tokenizer{suffix}"), local_files_only=True)
            except Exception as err:
                raise BackboneLoadError(f"text encoder{suffix}: could not load from {root}: {err}") from None
            parts += [model, tok]
        force_zeros = True
        index = root / "model_index.json"
        if index.is_file():
            force_zeros = bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
        return cls(*parts, force_zeros_for_empty_prompt=force_zeros)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        prompts = _check_prompts(prompts)
        states, pooled = [], None
        for model, tok in zip(self.models, self.tokenizers):
            ids = tok(
                prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(model.device)
            out = model(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if out[0].ndim == 2:  # the projected pooled output of the second encoder
                pooled = out[0]
        cond = Conditioning(torch.cat(states, dim=-1), None, pooled)
        return cond if self.image_size is None else with_time_ids(cond, default_time_ids(self.image_size))

    def encode_negative(self, prompts: list[str]) -> Conditioning:
        prompts = _check_prompts(prompts)
        cond = self.encode(prompts)
        if self.force_zeros_for_empty_prompt and all(p == "" for p in prompts):
            zero = Conditioning(torch.zeros_like(cond.tokens), None, torch.zeros_like(cond.pooled))
            return zero if cond.time_ids is None else with_time_ids(zero, cond.time_ids[0])
        return cond

    def to(self, device=None, dtype=None) -> SDXLTextEncoder:
        for model in self.models:
            model.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> SDXLTextEncoder:
        for model in self.models:
            model.requires_grad_(False).eval()
        return self

    def save(self, folder: Path, dtype: torch.dtype | None = None) -> None:
        for suffix, model, tok in zip(("", "_2"), self.models, self.tokenizers):
            state = None
            if dtype is not None:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
            out = Path(folder) / f"text_encoder{suffix}"
            model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
            tok.save_pretrained(str(Path(folder) / f"tokenizer{suffix}"))


def load_text_encoder(root: str | Path, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """The text encoder of a model folder: open_clip if ``text_encoder/open_clip_config.json`` exists, SDXL's pair
    if ``text_encoder_2`` exists, else HF CLIP."""
    root = Path(root)
    if (root / "text_encoder" / "open_clip_config.json").is_file():
        return OpenCLIPTextEncoder.from_folder(root, dtype)
    if (root / "text_encoder_2").is_dir():
        return SDXLTextEncoder.from_folder(root, dtype)
    return HFCLIPTextEncoder.from_folder(root, dtype)
