"""Staged training of the LLM bridge (strategies A -> B -> C) on `accelerate`.

One straight loop per stage: config -> data -> model -> optimizer -> loop -> checkpoint. Each step: plan
states (cached while the LLM is frozen) -> connector -> CFG dropout to the learned null -> frozen U-Net on
noised latents -> diffusion loss (+ lambda x CLIP alignment, + mu x LM loss on plan tokens). Checkpoints
are atomic and resume exactly (trainable weights, optimizer, LR schedule, EMA, RNG, stage and step). Each
finished stage is exported as a bridge folder (EMA weights) under ``out/stage-<names>``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from peft import LoraConfig, inject_adapter_in_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from alignment.bridge_data import BridgeData, hidden_state_cache, load_bridge_data
from alignment.loop import EMA, EpochSampler, JsonlLogger, TrainLoop, make_optimizer, warmup_cosine
from alignment.lora import lora_factors
from alignment.losses import ClipAlignmentHead, clip_alignment_loss, diffusion_loss, diffusion_target
from alignment.stages import BridgeTrainConfig, StageConfig
from diffusion_backbone.injection import time_embedding_dim
from diffusion_backbone.models import load_backbone
from diffusion_backbone.sampling import latent_shape, unet_forward
from diffusion_backbone.sdxl import default_time_ids, image_size, text_embeds_dim, uses_text_time
from llm_bridge.bridge import LLMBridge
from llm_bridge.connector import ConnectorConfig
from llm_bridge.encoder import PlanEncoder, PlanStates
from llm_bridge.layout import batch_region_masks
from safeio import InputError, atomic_dir, atomic_write_json, recover_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stage_generator(seed: int, stage_index: int) -> torch.Generator:
    """The CPU generator of one stage's noise, timesteps and CFG dropout: its own stream per stage position.

    CPU generators keep a run reproducible across devices (draws are moved to the model's device after).
    """
    return torch.Generator().manual_seed(seed * 7919 + 1_000_003 * (stage_index + 1))


def pooled_stream(backbone, pooled: bool, mode: str) -> dict:
    """The connector's pooled-stream settings for this base: on SDXL, the U-Net's own ``text_embeds`` and
    ``time_ids`` (replace mode; concat mode keeps SDXL's native pooled vector and time ids); elsewhere a
    zero-initialised time modulation when ``pooled`` is on."""
    unet = backbone.unet
    if uses_text_time(unet):
        if mode == "concat":
            return {}
        return {
            "d_text_embeds": text_embeds_dim(unet),
            "time_ids": default_time_ids(image_size(unet, backbone.vae)),
        }
    return {"d_time": time_embedding_dim(unet) if pooled else None}


def llm_blocks(model) -> tuple[str, list[nn.Module]]:
    """(name prefix, transformer blocks) of a HF causal LM (Llama/Qwen/Mistral, GPT-2)."""
    for prefix in ("model.layers", "transformer.h", "model.decoder.layers"):
        obj = model
        try:
            for part in prefix.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return prefix, list(obj)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


class BridgeTrainModule(nn.Module):
    """Everything a training step touches; ``forward(batch)`` returns the losses."""

    def __init__(self, bridge: LLMBridge, head: ClipAlignmentHead | None, encoder: PlanEncoder, unet, scheduler):
        super().__init__()
        self.bridge, self.head, self.llm, self.unet = bridge, head, encoder.model, unet
        self.encoder = encoder
        self.noise_scheduler = scheduler

    def forward(self, prompts, plans, states: PlanStates | None, z0, clip_image, native, native_null, drop, t,
                noise, stage: StageConfig, region_masks=None) -> dict[str, torch.Tensor]:  # fmt: skip
        lm = None
        if states is None:
            grad = any(p.requires_grad for p in self.llm.parameters())
            states, lm = self.encoder.encode_with_lm_loss(
                prompts, plans, grad=grad, lm_loss=stage.lm_loss_weight > 0 and plans is not None
            )
            states = states.to(dtype=torch.float32)
        timestep = t if self.bridge.connector.timestep_aware else None
        cond = self.bridge.conditioning(states, native, timestep, region_masks)
        null = self.bridge.null_conditioning(len(drop), native_null)
        if drop.any():
            cond = self.bridge.drop(cond, null, drop)
        zt = self.noise_scheduler.add_noise(z0, noise, t)
        pred = unet_forward(self.unet, zt, t, cond)
        losses = {
            "diffusion": diffusion_loss(
                pred, diffusion_target(self.noise_scheduler, z0, noise, t), t, self.noise_scheduler, stage.snr_gamma
            )
        }
        if stage.clip_align_weight > 0:
            selected = self.bridge.connector.select(states.states)
            pred_img = self.head(selected, states.mask)
            losses["clip_align"] = clip_alignment_loss(
                pred_img, clip_image, stage.clip_align_loss, self.head.logit_scale
            )
        if lm is not None:
            losses["lm"] = lm
        total = losses["diffusion"]
        if "clip_align" in losses:
            total = total + stage.clip_align_weight * losses["clip_align"]
        if "lm" in losses:
            total = total + stage.lm_loss_weight * losses["lm"]
        losses["total"] = total
        return losses


def is_cross_attn_kv(name: str) -> bool:
    """A U-Net cross-attention key/value parameter (what ``unet_cross_attn`` trains)."""
    return ".attn2.to_k" in name or ".attn2.to_v" in name


class BridgeTrainer:
    """Builds everything from a `BridgeTrainConfig` and runs its curriculum."""

    def __init__(self, cfg: BridgeTrainConfig, progress: bool = True):

        self.cfg, self.progress = cfg, progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cuda = torch.cuda.is_available()
        # some trainable parameters get no gradient in a given step (the learned null when no row is dropped, the
        # alignment head at weight 0), which DDP must be told about
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not cuda, kwargs_handlers=[ddp])
        self.progress = progress and self.accelerator.is_local_main_process  # one set of progress bars
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out)
        self.backbone = load_backbone(cfg.base)
        tok = AutoTokenizer.from_pretrained(cfg.planner, local_files_only=True)
        llm = load_llm(cfg, self.accelerator)
        if cfg.gradient_checkpointing:
            self.backbone.unet.enable_gradient_checkpointing()
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2 (the old name warns)
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.encoder = PlanEncoder(llm, tok, cfg.layers)
        batch = max(stage.batch_size for stage in cfg.stage_list())
        for stage in cfg.stage_list():
            if stage.batch_size % self.accelerator.num_processes:
                raise ValueError(
                    f"stage {stage.name}: batch_size {stage.batch_size} (the global batch) does not split evenly "
                    f"over {self.accelerator.num_processes} processes"
                )
        with self.accelerator.main_process_first():  # one process builds the caches, the others read them
            self.data: BridgeData = load_bridge_data(
                cfg.data, self.backbone, cfg.max_examples, self.progress, batch, clip_image_model=cfg.clip_image_model
            )
        aligned = [s.name for s in cfg.stage_list() if s.clip_align_weight > 0]
        if aligned and self.data.clip_image is None:
            raise ValueError(
                f"stage(s) {aligned} use the CLIP alignment loss, but the base {cfg.base} has no CLIP image tower: "
                "set clip_image_model to a local CLIP folder, or clip_align_weight: 0"
            )
        unet = self.backbone.unet
        ccfg = ConnectorConfig.from_preset(
            cfg.connector,
            d_llm=self.encoder.hidden_size,
            d_ctx=unet.config.cross_attention_dim,
            **pooled_stream(self.backbone, cfg.pooled, cfg.mode),
            layers=cfg.layers,
            num_llm_layers=self.encoder.num_layers if cfg.layers == "learned" else None,
            hierarchical=cfg.hierarchical,
            mode=cfg.mode,
            llm_dtype=cfg.llm_dtype,
            spatial=cfg.spatial,
            object_tokens=cfg.object_tokens,
            object_queries=cfg.object_queries,
            region_strength=cfg.region_strength,
            region_levels=cfg.region_levels,
        )
        null = self.data.native_null
        self.bridge = LLMBridge(ccfg, null.tokens[0], null.mask[0])
        self.bridge.attach(unet)
        clip = self.data.clip_image
        self.head = None if clip is None else ClipAlignmentHead(self.encoder.hidden_size, clip.shape[1])
        self.module = BridgeTrainModule(self.bridge, self.head, self.encoder, unet, self.backbone.training_scheduler())
        self._place_models()  # before any optimizer or EMA is made from the parameters
        self._inject_adapters()
        self.checkpoint_names = self._all_stage_param_names()
        self.states: PlanStates | None = None
        self.logger = JsonlLogger(self.out / "log.jsonl")

    # ---------------------------------------------------------------------------------------- structure
    def _place_models(self) -> None:
        """Every trained or run module on the accelerator's device (an 8-bit LLM was placed when loaded: bitsandbytes
        models cannot be moved)."""
        dev = self.accelerator.device
        for m in (self.bridge, self.head, self.backbone.unet):
            if m is not None:
                m.to(dev)
        if not getattr(self.encoder.model, "is_loaded_in_8bit", False):
            self.encoder.model.to(dev)

    def _inject_adapters(self) -> None:
        """Add every LoRA adapter any stage uses, up front (zero-initialised B: the identity until trained)."""

        stages = self.cfg.stage_list()
        llm_lora = [s for s in stages if "llm_top" in s.train and s.uses_lora("llm_top")]
        if llm_lora:
            k = max(s.llm_top_layers for s in llm_lora)
            prefix, blocks = llm_blocks(self.encoder.model)
            ids = "|".join(str(i) for i in range(len(blocks) - k, len(blocks)))
            linears = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|c_attn|c_proj|c_fc"
            pattern = rf"{re.escape(prefix)}\.({ids})\..*({linears})"
            inject_adapter_in_model(
                LoraConfig(r=llm_lora[0].llm_lora_rank, lora_alpha=llm_lora[0].llm_lora_rank, target_modules=pattern),
                self.encoder.model,
            )
        unet_lora = [s for s in stages if "unet_cross_attn" in s.train and s.uses_lora("unet_cross_attn")]
        if unet_lora:
            inject_adapter_in_model(
                LoraConfig(
                    r=unet_lora[0].unet_lora_rank,
                    lora_alpha=unet_lora[0].unet_lora_rank,
                    target_modules=r".*attn2\.(to_k|to_v)",
                ),
                self.backbone.unet,
            )

    def configure_stage(self, stage: StageConfig) -> list[dict]:
        """Freeze everything, then unfreeze exactly the stage's parameter groups; returns optimizer groups."""
        for m in (self.encoder.model, self.backbone.unet, self.bridge, self.head, self.backbone.vae):
            if m is not None:
                m.requires_grad_(False)
        groups = []
        if "connector" in stage.train:
            params = list(self.bridge.parameters()) + ([] if self.head is None else list(self.head.parameters()))
            for p in params:
                p.requires_grad_(True)
            groups.append({"params": params, "lr": stage.lr, "weight_decay": stage.weight_decay, "name": "connector"})
        if "llm_top" in stage.train:
            _, blocks = llm_blocks(self.encoder.model)
            for depth, block in enumerate(reversed(blocks[-stage.llm_top_layers :])):
                params = [p for n, p in block.named_parameters() if ("lora_" in n) == stage.uses_lora("llm_top")]
                for p in params:
                    p.requires_grad_(True)
                groups.append(
                    {
                        "params": params,
                        "lr": stage.llm_lr * stage.layer_decay**depth,
                        "weight_decay": 0.0,
                        "name": f"llm_block_-{depth + 1}",
                    }
                )
        if "unet_cross_attn" in stage.train:
            params = []
            for n, p in self.backbone.unet.named_parameters():
                if is_cross_attn_kv(n) and ("lora_" in n) == stage.uses_lora("unet_cross_attn"):
                    params.append(p)
            for p in params:
                p.requires_grad_(True)
            groups.append({"params": params, "lr": stage.unet_lr, "weight_decay": 0.0, "name": "unet_cross_attn"})
        for g in groups:
            if not g["params"]:
                raise ValueError(f"stage {stage.name}: parameter group {g['name']} has no parameters")
        return groups

    def trainable_names(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def _all_stage_param_names(self) -> set[str]:
        """Every parameter some stage trains (what a checkpoint must hold to resume any stage)."""
        names: set[str] = set()
        for stage in self.cfg.stage_list():
            self.configure_stage(stage)
            names |= set(self.trainable_names())
        return names

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, stage_index: int, step: int, opt, sched, ema: EMA, gen: torch.Generator) -> None:
        """Write the checkpoint (the main process; the others wait for it)."""
        if self.accelerator.is_main_process:
            self._write_checkpoint(stage_index, step, opt, sched, ema, gen)
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, stage_index: int, step: int, opt, sched, ema: EMA, gen: torch.Generator) -> None:
        with atomic_dir(self.out / "checkpoint") as tmp:
            params = {
                n: p.detach().contiguous() for n, p in self.module.named_parameters() if n in self.checkpoint_names
            }
            save_file(params, str(tmp / "trainable.safetensors"))
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            torch.save(sched.state_dict(), tmp / "lr_scheduler.pt")
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
            save_file({"torch": torch.get_rng_state(), "gen": gen.get_state()}, str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"stage_index": stage_index, "step": step}))

    def load_state(self) -> tuple[int, int]:
        folder = recover_dir(self.out / "checkpoint")
        if not (folder / "state.json").is_file():
            return 0, 0
        try:
            state = json.loads((folder / "state.json").read_text())
            params = dict(self.module.named_parameters())
            with torch.no_grad():
                for k, v in load_file(str(folder / "trainable.safetensors")).items():
                    params[k].copy_(v)
        except (OSError, KeyError, RuntimeError, json.JSONDecodeError) as err:
            raise InputError(f"checkpoint {folder} is corrupt or does not match this config: {err}") from None
        return int(state["stage_index"]), int(state["step"])

    # ---------------------------------------------------------------------------------------- export
    @torch.no_grad()
    def export(self, folder: Path, upto: int | None = None) -> Path:
        """Save the bridge with the LLM / U-Net weights fine-tuned by stages ``0..upto`` (all by default): LoRA
        layers as their low-rank factors, fully trained weights as they are; frozen weights are left out (they
        equal the base)."""

        done = self.cfg.stage_list()[: None if upto is None else upto + 1]
        deltas = {}
        for key, model in (("llm_top", self.encoder.model), ("unet_cross_attn", self.backbone.unet)):
            modes = {"lora" if s.uses_lora(key) else "full" for s in done if key in s.train}
            if not modes:
                continue  # no stage so far trained this group: its weights equal the base
            delta = {}
            if "lora" in modes:  # LoRA layers: store the factors (scaling folded in), not merged weights
                delta.update(lora_factors(model, lambda plain, key=key: self._exported_param(key, plain)))
            if "full" in modes:  # fully fine-tuned: every (non-LoRA) weight of the group as it is now
                for n, p in model.named_parameters():
                    plain = n.replace(".base_layer", "")
                    if "lora_" not in n and self._exported_param(key, plain):
                        delta[plain] = p.detach().clone()
            deltas[key] = delta
        self.bridge.llm_delta = deltas.get("llm_top", {})
        self.bridge.unet_delta = {
            k: v for k, v in deltas.get("unet_cross_attn", {}).items() if not k.startswith("class_embedding")
        }
        return self.bridge.save_pretrained(folder)

    def _exported_param(self, key: str, name: str) -> bool:
        return is_cross_attn_kv(name) if key == "unet_cross_attn" else self._in_top_blocks(name)

    def _in_top_blocks(self, name: str) -> bool:
        prefix, blocks = llm_blocks(self.encoder.model)
        k = max([s.llm_top_layers for s in self.cfg.stage_list() if "llm_top" in s.train] or [0])
        return any(name.startswith(f"{prefix}.{i}.") for i in range(len(blocks) - k, len(blocks)))

    # ---------------------------------------------------------------------------------------- training
    def hidden_states(self, stage: StageConfig) -> PlanStates | None:
        """The cached plan states, when this stage leaves the LLM frozen and caching is on."""
        if "llm_top" in stage.train or not self.cfg.cache_hidden or self.cfg.layers == "learned":
            return None
        if self.states is None:
            with self.accelerator.main_process_first():
                self.states = hidden_state_cache(
                    self.encoder,
                    self.data,
                    self.cfg.planner,
                    self.cfg.use_planner,
                    Path(self.cfg.data) / "cache",
                    progress=self.progress,
                )
        return self.states

    def region_masks(self, plans: list[str] | None) -> torch.Tensor | None:
        """Region masks of a batch's plans at the latent resolution (spatial injection on), else None."""
        if not self.cfg.spatial or plans is None:
            return None
        return batch_region_masks(plans, latent_shape(self.backbone.unet, 1)[2:])

    def run(self) -> list[Path]:
        cfg = self.cfg
        main = self.accelerator.is_main_process
        if main:
            atomic_write_json(self.out / "config.json", json.loads(json.dumps(cfg, default=lambda o: o.__dict__)))
        start_stage, start_step = self.load_state()
        if main and (start_stage or start_step):
            self.logger.truncate_after(sum(s.steps for s in cfg.stage_list()[:start_stage]) + start_step)
        exports = []
        done_names = []
        stop_at = cfg.stop_at
        for si, stage in enumerate(cfg.stage_list()):
            done_names.append(stage.name)
            folder = self.out / f"stage-{''.join(done_names)}"
            if si < start_stage:
                exports.append(folder)
                continue
            offset = sum(s.steps for s in cfg.stage_list()[:si])
            finished = self._run_stage(si, stage, start_step if si == start_stage else 0, offset, stop_at)
            if not finished:
                return exports
            if main:
                self.export(folder, upto=si)
            self.accelerator.wait_for_everyone()
            exports.append(folder)
            self.save_checkpoint(si + 1, 0, *self._fresh_state(min(si + 1, len(cfg.curriculum) - 1)))
        return exports

    def _fresh_state(self, si: int):
        """Optimizer, LR schedule, EMA and the noise/timestep/dropout generator of stage ``si``."""
        stage = self.cfg.stage_list()[si]
        groups = self.configure_stage(stage)
        opt = make_optimizer(self.cfg.optimizer, groups)
        sched = warmup_cosine(opt, stage.steps, stage.warmup, stage.min_lr_ratio)
        ema = EMA(self.trainable_names(), stage.ema_decay, warmup=stage.ema_warmup)
        return opt, sched, ema, stage_generator(self.cfg.seed, si)

    @property
    def device(self) -> torch.device:
        """Where the models are (after ``accelerator.prepare``): every batch tensor is moved here."""
        return next(self.backbone.unet.parameters()).device

    def make_batch(self, stage: StageConfig, batch: torch.Tensor, gen: torch.Generator, states) -> dict:
        """The keyword arguments of `BridgeTrainModule.forward` for this process's share of the global batch
        ``batch`` (rows ``rank::world``), on the models' device.

        Noise, timesteps and CFG dropout are drawn for the whole global batch from the stage's CPU generator (the
        same stream in every process), then sliced and moved, so N processes see exactly the draws one process
        would, on any device.
        """
        data, dev, acc = self.data, self.device, self.accelerator
        b = len(batch)
        n_train_t = self.module.noise_scheduler.config.num_train_timesteps
        mine = slice(acc.process_index, None, acc.num_processes)
        drop = (torch.rand(b, generator=gen) < stage.cfg_dropout)[mine]
        t = torch.randint(0, n_train_t, (b,), generator=gen)[mine]
        noise = torch.randn((b, *data.latents.shape[1:]), generator=gen)[mine]
        idx = batch[mine]
        plans = [data.plans[i] for i in idx] if self.cfg.use_planner else None
        masks = self.region_masks(plans)
        return {
            "prompts": [data.prompts[i] for i in idx],
            "plans": plans,
            "states": None if states is None else states.index(idx).to(dev, torch.float32),
            "z0": data.latents[idx].to(dev),
            "clip_image": None if data.clip_image is None else data.clip_image[idx].to(dev),
            "native": data.native(idx).to(dev) if self.cfg.mode == "concat" else None,
            "native_null": data.native_null.to(dev),
            "drop": drop.to(dev),
            "t": t.to(dev),
            "noise": noise.to(dev),
            "stage": stage,
            "region_masks": None if masks is None else masks.to(dev),
        }

    def _restore_stage(self, stage: StageConfig, opt, sched, ema: EMA, gen: torch.Generator) -> None:
        folder = self.out / "checkpoint"
        try:
            opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
            sched.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
            ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
            rng = load_file(str(folder / "rng.safetensors"))
            torch.set_rng_state(rng["torch"])
            gen.set_state(rng["gen"])
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise InputError(f"checkpoint {folder} does not match stage {stage.name}: {err}") from None

    def _run_stage(self, si: int, stage: StageConfig, start: int, offset: int, stop_at: int | None) -> bool:
        """Run optimizer steps ``start..`` of stage ``si`` through the one loop; ``stage.steps`` counts optimizer
        steps, each of ``grad_accum`` micro-batches. Returns whether the stage finished (not stopped by
        ``stop_at``)."""
        acc = self.accelerator
        opt, sched, ema, gen = self._fresh_state(si)
        if start > 0:
            self._restore_stage(stage, opt, sched, ema, gen)
        module, opt = acc.prepare(self.module, opt)
        states = self.hidden_states(stage)
        sampler = EpochSampler(len(self.data), stage.batch_size, self.cfg.seed + 31 * si)
        self.module.train()
        self.backbone.unet.eval()  # no dropout in the frozen parts
        # HF models checkpoint only in train mode: with gradient checkpointing a stage that trains the LLM runs it
        # in train mode (Llama / Qwen2 / Mistral have no dropout by default; GPT-2's then applies)
        llm_checkpointing = self.cfg.gradient_checkpointing and "llm_top" in stage.train
        self.encoder.model.train(llm_checkpointing)
        end = stage.steps if stop_at is None else min(stage.steps, max(0, stop_at - offset))
        loop = TrainLoop(
            acc, module, opt, sched, [p for g in opt.param_groups for p in g["params"]],
            grad_clip=stage.grad_clip, grad_accum=stage.grad_accum, ema=ema, logger=self.logger,
            log_every=self.cfg.log_every, checkpoint_every=self.cfg.checkpoint_every, loss_key="total",
            step_offset=offset, log_fields={"stage": stage.name}, desc=f"stage {stage.name}", progress=self.progress,
        )  # fmt: skip

        def losses(micro: int) -> dict[str, torch.Tensor]:
            # the global batch; each process takes its rows in make_batch
            return module(**self.make_batch(stage, sampler.batch(micro), gen, states))

        def what(micro: int) -> str:
            return f"loss (stage {stage.name}, batch rows {sampler.batch(micro)[:6].tolist()}...)"

        def save(step: int) -> None:
            self.save_checkpoint(si, step, opt, sched, ema, gen)

        loop.run(losses, start, end, stage.steps, save, what)
        if end < stage.steps:
            return False
        ema.copy_to()  # export the EMA weights
        return True


def load_llm(cfg: BridgeTrainConfig, accelerator: Accelerator):
    """The planner LLM, frozen: at ``llm_dtype``, or in 8-bit with ``llm_load_in_8bit`` (bitsandbytes on this
    process's GPU, prepared for LoRA training with peft's k-bit preparation)."""
    kwargs = {"local_files_only": True, "dtype": DTYPES[cfg.llm_dtype]}
    if cfg.llm_load_in_8bit:
        if not torch.cuda.is_available():
            raise InputError("llm_load_in_8bit (bitsandbytes 8-bit LLM) needs a CUDA GPU; none is available")
        kwargs.update(
            quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": accelerator.local_process_index}
        )
    llm = AutoModelForCausalLM.from_pretrained(cfg.planner, **kwargs)
    if cfg.llm_load_in_8bit:
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return llm.requires_grad_(False).eval()


def train_bridge(cfg: BridgeTrainConfig, progress: bool = True) -> list[Path]:
    """Run the curriculum of ``cfg`` (resuming from ``cfg.out/checkpoint``); returns the exported stage folders."""
    return BridgeTrainer(cfg, progress).run()
