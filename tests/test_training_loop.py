"""The training loop's defects found on review, each with a test that fails without its fix, and device
placement: every batch tensor follows the models' device (checked with the models on ``meta``, where a CPU
tensor left behind is visible)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_planner, save_tiny_sd, save_tiny_toy_base, tiny_bridge_config

from alignment.bridge_training import BridgeTrainer
from alignment.loop import EMA, make_optimizer
from alignment.stages import config_from_dict
from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.models import load_backbone
from diffusion_backbone.text_encoders import HFCLIPTextEncoder
from llm_bridge.encoder import PlanStates
from toyworld.data import build_dataset, load_dataset_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_dataset(root / "data", n=40, seed=3, workers=1, heldout_fraction=0.1, progress=False)
    prompts = list(load_dataset_dir(root / "data")["prompt"])
    return {
        "data": root / "data",
        "base": save_tiny_toy_base(root / "base", prompts),
        "planner": save_tiny_planner(root / "llm"),
    }


def _cfg(world, out, stages, **kw):
    return config_from_dict(tiny_bridge_config(world["data"], world["base"], world["planner"], out, stages, **kw))


def test_each_stage_draws_its_own_noise_timesteps_and_dropout(world, tmp_path):
    # was: every stage seeded with len(stage.name), so A, B and C shared one stream
    stages = {name: {"train": ["connector"], "steps": 1, "batch_size": 4} for name in ("A", "B", "C")}
    trainer = BridgeTrainer(_cfg(world, tmp_path / "run", stages), progress=False)
    draws = [trainer._fresh_state(si)[3] for si in range(3)]
    first = [torch.randn(8, generator=g) for g in draws]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    again = torch.randn(8, generator=trainer._fresh_state(1)[3])
    assert torch.equal(first[1], again)  # and each stream is reproducible


def test_ema_and_lr_schedule_move_once_per_optimizer_step(world, tmp_path):
    # was: the EMA was updated on every gradient-accumulation micro-step
    stages = {"A": {"train": ["connector"], "steps": 4, "batch_size": 4, "grad_accum": 2, "warmup": 1}}
    BridgeTrainer(_cfg(world, tmp_path / "run", stages, stop_at=3), progress=False).run()
    ckpt = tmp_path / "run" / "checkpoint"
    ema_updates = int(load_file(str(ckpt / "ema.safetensors"))["@num_updates"].item())
    sched_steps = torch.load(ckpt / "lr_scheduler.pt", weights_only=True)["last_epoch"]
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    adam_steps = {int(v["step"]) for v in opt["state"].values()}
    assert ema_updates == sched_steps == 3 and adam_steps == {3}  # steps count optimizer steps
    records = [line for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == 3  # one log record per optimizer step


def _devices(obj) -> set[str]:
    if isinstance(obj, torch.Tensor):
        return {obj.device.type}
    if isinstance(obj, (Conditioning, PlanStates)):
        fields = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
        return set().union(*(_devices(v) for v in fields))
    if isinstance(obj, dict):
        return set().union(set(), *(_devices(v) for v in obj.values()))
    return set()


@pytest.mark.parametrize("mode", ["replace", "concat"])
def test_training_batches_follow_the_models_device(world, tmp_path, mode):
    # was: batches were never moved to the accelerator's device, so the first GPU step would fail
    stages = {"A": {"train": ["connector"], "steps": 1, "batch_size": 4, "clip_align_weight": 0.1}}
    trainer = BridgeTrainer(_cfg(world, tmp_path / "run", stages, mode=mode, spatial=True), progress=False)
    stage = trainer.cfg.stage_list()[0]
    states = trainer.hidden_states(stage)
    trainer.module.to("meta")  # a device no CPU tensor can meet without an error
    batch = trainer.make_batch(stage, torch.arange(4), trainer._fresh_state(0)[3], states)
    assert _devices(batch) == {"meta"}
    # (the forward itself cannot run on meta: it branches on data, e.g. whether any row is CFG-dropped)


def test_saving_an_hf_clip_encoder_at_a_dtype_leaves_the_live_model_alone(tmp_path):
    # was: save(dtype=...) cast the live encoder in place
    enc = load_backbone(save_tiny_sd(tmp_path / "sd")).text_encoder
    assert isinstance(enc, HFCLIPTextEncoder)
    before = next(enc.model.parameters()).dtype
    enc.save(tmp_path / "out", dtype=torch.float16)
    assert next(enc.model.parameters()).dtype == before == torch.float32
    saved = HFCLIPTextEncoder.from_folder(tmp_path / "out", dtype=torch.float16)
    assert next(saved.model.parameters()).dtype == torch.float16


def test_gradient_checkpointing_gives_the_same_losses_and_8bit_adam_needs_cuda(world, tmp_path):
    stages = {
        "A": {"train": ["connector"], "steps": 3, "batch_size": 4, "warmup": 1},
        "B": {"train": ["connector", "llm_top"], "steps": 2, "batch_size": 4, "warmup": 1, "llm_top_layers": 1,
              "llm_lora_rank": 2},
    }  # fmt: skip
    runs = {}
    for name, flag in (("plain", False), ("ckpt", True)):
        cfg = _cfg(world, tmp_path / name, stages, gradient_checkpointing=flag, curriculum=["A", "B"])
        trainer = BridgeTrainer(cfg, progress=False)
        assert trainer.backbone.unet.is_gradient_checkpointing == flag
        assert trainer.encoder.model.is_gradient_checkpointing == flag  # the LLM's too (stage B trains it)
        trainer.run()
        runs[name] = [json.loads(x)["total"] for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(runs["ckpt"]), torch.tensor(runs["plain"]), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="optimizer must be"):
        _cfg(world, tmp_path / "x", stages, optimizer="sgd")
    full_b = {**stages, "B": {**stages["B"], "llm_lora_rank": 0}}
    with pytest.raises(ValueError, match=r"\['B'\] train llm_top in full, but an 8-bit LLM"):
        _cfg(world, tmp_path / "x", full_b, llm_load_in_8bit=True, curriculum=["A", "B"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            make_optimizer("adamw8bit", [{"params": [torch.nn.Parameter(torch.zeros(2))]}])
        with pytest.raises(ValueError, match="llm_load_in_8bit .* needs a CUDA GPU"):
            BridgeTrainer(_cfg(world, tmp_path / "y", stages, llm_load_in_8bit=True), progress=False)


def test_ema_follows_its_parameters_to_their_device():
    # was: the averages stayed where the EMA was made, so a model moved by accelerator.prepare (CPU -> GPU) after
    # the EMA was built failed at the first update
    lin = torch.nn.Linear(3, 2)
    ema = EMA(dict(lin.named_parameters()), decay=0.9)
    # the same parameters, now on another device (as module.to("cuda") leaves them; meta stands in for the GPU)
    ema.params = {n: torch.nn.Parameter(p.detach().to("meta")) for n, p in ema.params.items()}
    ema.update()
    assert {t.device.type for t in ema.shadow.values()} == {"meta"}
