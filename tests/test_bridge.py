"""The LLM bridge: injection invariances, CFG null, staged freezing, exact resume, stock-diffusers drive,
training in every stage with tiny Llama/Qwen2, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny_models import save_tiny_planner, save_tiny_toy_base, tiny_bridge_config, tiny_scheduler, tiny_unet

from alignment.bridge_training import BridgeTrainer
from alignment.stages import config_from_dict
from diffusion_backbone.conditioning import Conditioning, prompt_embeds_pair
from diffusion_backbone.injection import TimeModulation, install_time_modulation, time_embedding_dim
from diffusion_backbone.sampling import sample, unet_forward
from llm_bridge.bridge import BridgeLoadError, LLMBridge
from llm_bridge.connector import CONNECTOR_PRESETS, ConnectorConfig
from llm_bridge.encoder import PlanEncoder
from llm_bridge.pipeline import Plan2ImgPipeline
from planner.schema import PlanError
from toyworld import vocab as V
from toyworld.data import build_dataset, load_dataset_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_dataset(root / "data", n=48, seed=2, workers=1, heldout_fraction=0.1, progress=False)
    prompts = list(load_dataset_dir(root / "data")["prompt"])
    base = save_tiny_toy_base(root / "base", prompts)
    planners = {arch: save_tiny_planner(root / arch, arch) for arch in ("llama", "qwen2")}
    return {"root": root, "data": root / "data", "base": base, "planners": planners}


def _cfg(world, tmp_path, arch="llama", **kw):
    stages = kw.pop("stages", {"A": {"train": ["connector"], "steps": 2, "batch_size": 4, "clip_align_weight": 0.1}})
    planner = world["planners"][arch]
    return config_from_dict(tiny_bridge_config(world["data"], world["base"], planner, tmp_path / "run", stages, **kw))


ABC = {
    "A": {"train": ["connector"], "steps": 2, "batch_size": 4, "clip_align_weight": 0.1},
    "B": {
        "train": ["connector", "llm_top"],
        "steps": 2,
        "batch_size": 4,
        "llm_top_layers": 1,
        "llm_lora_rank": 2,
        "lm_loss_weight": 0.1,
    },
    "C": {
        "train": ["connector", "llm_top", "unet_cross_attn"],
        "steps": 2,
        "batch_size": 4,
        "llm_top_layers": 1,
        "llm_lora_rank": 2,
        "unet_cross_attn": "lora",
        "unet_lora_rank": 2,
        "unet_lr": 1e-3,
    },
}


def test_zero_initialised_pooled_stream_leaves_the_unet_unchanged():
    unet = tiny_unet()
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    before = unet(z, 10, encoder_hidden_states=ctx).sample
    install_time_modulation(unet, TimeModulation(16, time_embedding_dim(unet)))
    after = unet_forward(unet, z, 10, Conditioning(ctx, pooled=torch.randn(2, 16)))
    assert torch.equal(before, after)


def test_cfg_dropout_feeds_the_null_conditioning():
    cfg = ConnectorConfig.from_preset("mlp", d_llm=8, d_ctx=6, d_time=12)
    bridge = LLMBridge(cfg, torch.randn(3, 6), None)
    cond = Conditioning(torch.randn(4, 5, 6), torch.ones(4, 5, dtype=torch.bool), torch.randn(4, cfg.d_pooled))
    null = bridge.null_conditioning(4)
    mixed = bridge.drop(cond, null, torch.tensor([True, False, True, False]))
    for i, dropped in enumerate([True, False, True, False]):
        src = null if dropped else cond
        m = mixed.mask[i]
        assert torch.equal(mixed.tokens[i][m], src.tokens[i][src.mask[i]])
        assert torch.equal(mixed.pooled[i], src.pooled[i])


def test_every_preset_builds_and_runs(world):
    from llm_bridge.encoder import PlanStates

    states = PlanStates(
        torch.randn(2, 7, 16), torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool(), torch.randint(0, 8, (2, 7))
    )
    for name in CONNECTOR_PRESETS:
        for hier in ("off", "fixed", "learned"):
            cfg = ConnectorConfig.from_preset(name, d_llm=16, d_ctx=12, d_time=20, hierarchical=hier, width=32)
            bridge = LLMBridge(cfg, torch.zeros(3, 12), None)
            cond = bridge.conditioning(states, timestep=torch.tensor([5, 900]))
            assert cond.tokens.shape[0] == 2 and cond.dim == 12 and cond.pooled.shape == (2, cfg.d_pooled)
            assert (cond.per_depth is not None) == (hier != "off")


def test_stages_freeze_exactly_what_they_say(world, tmp_path):
    trainer = BridgeTrainer(_cfg(world, tmp_path, stages=ABC), progress=False)
    named = dict(trainer.module.named_parameters())
    for stage in trainer.cfg.stage_list():
        trainer.configure_stage(stage)
        for n, p in named.items():
            if n.startswith(("bridge.", "head.")):
                expected = True
            elif n.startswith("llm."):
                top = n.startswith("llm.model.layers.1.") and "lora_" in n
                expected = "llm_top" in stage.train and top
            elif n.startswith("unet."):
                expected = "unet_cross_attn" in stage.train and "attn2.to_" in n and "lora_" in n
            else:
                expected = False
            assert p.requires_grad == expected, (stage.name, n)
    # two steps of stage C (the warmup's first step has learning rate 0, transformers' convention): frozen
    # weights stay bit-identical, trained ones move
    before = {n: p.detach().clone() for n, p in named.items()}
    stage = trainer.cfg.stage_list()[2]
    trainer._run_stage(2, stage, 0, 0, stop_at=2)
    trainable = {n for n, p in named.items() if p.requires_grad}
    for n, p in named.items():
        if n not in trainable:
            assert torch.equal(p, before[n]), n
    moved = [n for n in trainable if not torch.equal(named[n], before[n])]
    assert any(n.startswith("unet.") for n in moved) and any(n.startswith("llm.") for n in moved)


def _losses(path):
    return [json.loads(line)["total"] for line in path.read_text().splitlines()]


def test_resume_gives_the_same_loss_sequence(world, tmp_path):
    stages = {"A": {"train": ["connector"], "steps": 6, "batch_size": 4, "clip_align_weight": 0.1}}
    BridgeTrainer(_cfg(world, tmp_path / "a", stages=stages), progress=False).run()
    BridgeTrainer(_cfg(world, tmp_path / "b", stages=stages, stop_at=3, checkpoint_every=100), progress=False).run()
    BridgeTrainer(_cfg(world, tmp_path / "b", stages=stages), progress=False).run()
    a, b = _losses(tmp_path / "a" / "run" / "log.jsonl"), _losses(tmp_path / "b" / "run" / "log.jsonl")
    assert len(a) == 6 and a == b


def test_killed_during_a_checkpoint_write_the_last_good_one_loads_and_resume_continues_the_same_losses(
    world, tmp_path
):
    """SIGKILL a training process while it writes its step-4 checkpoint: the step-2 checkpoint is intact, and a
    resume reproduces an uninterrupted run's losses step for step (those the killed run logged included)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the helper process: the same reduction order, so losses compare exactly
    try:
        _kill_during_save_and_resume(world, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_during_save_and_resume(world, tmp_path):
    stages = {"A": {"train": ["connector"], "steps": 6, "batch_size": 4, "clip_align_weight": 0.1}}
    BridgeTrainer(_cfg(world, tmp_path / "a", stages=stages), progress=False).run()
    cfg = tiny_bridge_config(world["data"], world["base"], world["planners"]["llama"], tmp_path / "b" / "run", stages,
                             checkpoint_every=2)  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    marker = tmp_path / "half-written"
    helper = Path(__file__).with_name("kill_during_save.py")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)]),
    }
    proc = subprocess.Popen([sys.executable, str(helper), str(tmp_path / "cfg.json"), str(marker), "4"], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.25)
        assert marker.exists(), f"the helper never reached the step-4 checkpoint: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    checkpoint = tmp_path / "b" / "run" / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text()) == {"stage_index": 0, "step": 2}
    killed = {
        r["step"]: r["total"] for r in map(json.loads, (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines())
    }
    assert sorted(killed) == [1, 2, 3, 4]  # it trained to step 4 and died writing that checkpoint
    trainer = BridgeTrainer(config_from_dict(cfg), progress=False)
    assert trainer.load_state() == (0, 2)  # the last good checkpoint loads
    trainer.run()
    a = _losses(tmp_path / "a" / "run" / "log.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r["total"] for r in rows}
    assert [resumed[s] for s in range(1, 7)] == a
    assert all(killed[s] == resumed[s] for s in killed)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_planner_trains_in_every_stage_and_generates(world, tmp_path, arch):
    trainer = BridgeTrainer(_cfg(world, tmp_path, arch, stages=ABC, hierarchical="fixed"), progress=False)
    exports = trainer.run()
    assert [f.name for f in exports] == ["stage-A", "stage-AB", "stage-ABC"]
    final = LLMBridge.from_pretrained(exports[-1])
    assert final.llm_delta and final.unet_delta
    after_a, after_ab = LLMBridge.from_pretrained(exports[0]), LLMBridge.from_pretrained(exports[1])
    assert not after_a.llm_delta and not after_a.unet_delta  # nothing but the connector trained yet
    assert after_ab.llm_delta and not after_ab.unet_delta
    pipe = Plan2ImgPipeline.from_pretrained(world["planners"][arch], exports[-1], world["base"], spec=V.TOY_PLAN_SPEC)
    out = pipe(["a red circle", "two stars"], seeds=[0, 1], steps=2)
    assert out.images.shape == (2, 64, 64, 3) and all(r.plan is not None for r in out.plans)
    assert set(out.timings) == {"planning", "llm_forward", "connector", "denoise", "decode"}
    again = pipe(["a red circle", "two stars"], seeds=[0, 1], steps=2)
    assert np.array_equal(out.images, again.images)
    with pytest.raises(PlanError, match="prompt #0"):
        pipe(["x"], plans=["<IMG_BEGIN> <STYLE> nonsense <IMG_END>"], steps=2)


def test_conditioning_drives_stock_stable_diffusion_pipeline(world):
    from tiny_models import tiny_vae

    unet, vae = tiny_unet(), tiny_vae()

    sched = tiny_scheduler()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = AutoModelForCausalLM.from_pretrained(str(world["planners"]["llama"]), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(world["planners"]["llama"]), local_files_only=True)
    enc = PlanEncoder(llm, tok, "mean")
    cfg = ConnectorConfig.from_preset("resampler-32q", d_llm=enc.hidden_size, d_ctx=32, width=32)
    bridge = LLMBridge(cfg, torch.randn(32, 32), None)  # 32 null tokens: the same length as the connector's
    torch.nn.init.normal_(bridge.connector.proj.weight, std=0.5)  # visibly non-trivial conditioning
    plan = "<IMG_BEGIN> <STYLE> plain background <OBJECT> 1 medium red circle at center <IMG_END>"
    with torch.no_grad():
        cond = bridge.conditioning(enc.encode(["a red circle"], [plan]))
        null = bridge.null_conditioning(1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, negative_prompt_embeds = prompt_embeds_pair(cond, null)
    stock = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    ours = sample(
        unet,
        sched,
        cond,
        null,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-4)


def test_connector_that_does_not_fit_the_unet_is_refused():
    unet = tiny_unet(cross_attention_dim=32)
    bridge = LLMBridge(ConnectorConfig.from_preset("linear", d_llm=8, d_ctx=48), torch.zeros(2, 48), None)
    with pytest.raises(BridgeLoadError, match="width 48"):
        bridge.attach(unet)
    bridge = LLMBridge(ConnectorConfig.from_preset("linear", d_llm=8, d_ctx=32, d_time=99), torch.zeros(2, 32), None)
    with pytest.raises(BridgeLoadError, match="time embedding"):
        bridge.attach(unet)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"curriculum": ["A", "D"]}, "undefined stage"),
        ({"stages": {"A": {"train": ["connector", "vae"]}}}, "unknown parameter group"),
        ({"stages": {"A": {"trian": ["connector"]}}}, "unknown key"),
        ({"conector": "mlp"}, "unknown key"),
    ],
)
def test_bad_configs_name_the_problem(change, words):
    base = {"stages": {"A": {"train": ["connector"]}}, "curriculum": ["A"]}
    base.update(change)
    with pytest.raises(ValueError, match=words):
        config_from_dict(base)


def test_yaml_exponent_strings_read_as_floats_and_words_still_refused():
    """PyYAML reads ``3e-4`` (no dot) as a string; a float field takes it as the number it is."""
    base = {"stages": {"A": {"train": ["connector"], "lr": "3e-4"}}, "curriculum": ["A"]}
    assert config_from_dict(base).stages["A"].lr == pytest.approx(3e-4)
    for word in ("fast", "nan", "1e999"):
        base["stages"]["A"]["lr"] = word
        with pytest.raises(ValueError, match="lr must be float"):
            config_from_dict(base)


class _AllNaN:
    """A cache column whose rows read as NaN (the cache on disk is memory-mapped, not written to)."""

    def __init__(self, column):
        self.column, self.shape = column, column.shape

    def __getitem__(self, idx):
        return torch.full_like(self.column[idx], float("nan"))


def test_nan_loss_stops_naming_step_and_batch_and_keeps_last_checkpoint(world, tmp_path):
    stages = {"A": {"train": ["connector"], "steps": 6, "batch_size": 4}}
    cfg = _cfg(world, tmp_path, stages=stages, checkpoint_every=1, stop_at=2)
    BridgeTrainer(cfg, progress=False).run()
    cfg = _cfg(world, tmp_path, stages=stages, checkpoint_every=1)
    trainer = BridgeTrainer(cfg, progress=False)
    trainer.data.latents = _AllNaN(trainer.data.latents)
    with pytest.raises(FloatingPointError, match=r"at step 2.*|step 2") as info:
        trainer.run()
    assert "batch rows" in str(info.value)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state == {"stage_index": 0, "step": 2}


@pytest.fixture(scope="module")
def trained_bridge(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("bridge_run")
    cfg = config_from_dict(
        {
            "data": str(world["data"]),
            "base": str(world["base"]),
            "planner": str(world["planners"]["llama"]),
            "out": str(out / "run"),
            "connector": "mlp",
            "mode": "concat",
            "mixed_precision": "no",
            "stages": {"A": {"train": ["connector"], "steps": 2, "batch_size": 4}},
        }
    )
    return BridgeTrainer(cfg, progress=False).run()[-1]


def test_cli_plan_generate_eval_with_a_bridge(world, trained_bridge, tmp_path, capsys):
    from plan2img.cli import main

    models = ["--llm", str(world["planners"]["llama"]), "--bridge", str(trained_bridge), "--model", str(world["base"])]
    assert main(["plan", "a red circle", "two stars", "--json", "--llm", str(world["planners"]["llama"])]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(x["plan"].startswith("<IMG_BEGIN>") for x in lines)
    png = tmp_path / "g.png"
    assert main(["generate", "a red circle", "-o", str(png), "--steps", "2", "--n", "2", *models]) == 0
    assert "plan: <IMG_BEGIN>" in capsys.readouterr().out and png.stat().st_size > 100
    for source in ("oracle", "planner", "none"):
        out = tmp_path / f"eval-{source}"
        assert (
            main(
                [
                    "eval",
                    "--generate",
                    "bridge",
                    "--plan-source",
                    source,
                    "--limit-per-task",
                    "1",
                    "--n-per-prompt",
                    "1",
                    "--steps",
                    "2",
                    "--out",
                    str(out),
                    *models,
                ]
            )
            == 0
        )
        assert json.loads((out / "summary.json").read_text())["n_images"] == 10


def test_cli_train_reports_bad_config(tmp_path, capsys):
    from plan2img.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("stages: {A: {train: [connector]}}\ncurriculum: [A, Z]\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "undefined stage" in capsys.readouterr().err


def test_routing_with_the_main_tokens_everywhere_changes_nothing():
    from diffusion_backbone.injection import GROUPS, install_routing
    from diffusion_backbone.toy import toy_unet

    unet = toy_unet(16, 8, (32, 32, 32), 8)
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    plain = unet_forward(unet, z, 10, Conditioning(ctx, mask))
    groups = install_routing(unet)
    assert set(groups.values()) == set(GROUPS)
    same = Conditioning(ctx, mask, per_depth={g: Conditioning(ctx, mask) for g in GROUPS})
    torch.testing.assert_close(unet_forward(unet, z, 10, same), plain)
    other = Conditioning(ctx, mask, per_depth={"outer": Conditioning(torch.randn(2, 3, 16))})
    assert not torch.allclose(unet_forward(unet, z, 10, other), plain)


def test_exported_low_rank_deltas_reproduce_the_trained_weights(world, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from diffusion_backbone.models import load_backbone
    from llm_bridge.bridge import apply_delta
    from planner.planner import Planner

    trainer = BridgeTrainer(_cfg(world, tmp_path, "llama", stages=ABC), progress=False)
    final = LLMBridge.from_pretrained(trainer.run()[-1])
    fresh_llm = Planner.from_pretrained(world["planners"]["llama"], spec=V.TOY_PLAN_SPEC).model
    fresh_unet = load_backbone(world["base"]).unet
    for trained, fresh, delta in (
        (trainer.encoder.model, fresh_llm, final.llm_delta),
        (trainer.backbone.unet, fresh_unet, final.unet_delta),
    ):
        assert any(k.endswith("::lora_down") for k in delta)  # LoRA stages export factors, not merged weights
        for m in trained.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
        want = {n.replace(".base_layer", ""): p for n, p in trained.named_parameters() if "lora_" not in n}
        apply_delta(fresh, delta, "model")
        apply_delta(fresh, delta, "model")  # applying the same delta again changes nothing
        changed = 0
        for n, p in fresh.named_parameters():
            torch.testing.assert_close(p, want[n], atol=1e-5, rtol=1e-5, msg=n)
            changed += n.split("::")[0] in {k.split("::")[0] for k in delta}
        assert changed > 0


def test_ema_warmup_tracks_a_short_run_and_resumes_its_schedule():
    from alignment.loop import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema, fixed = EMA({"w": p}, 0.999), EMA({"w": p}, 0.999, warmup=False)
    with torch.no_grad():
        p.fill_(1.0)
    for _ in range(100):
        ema.update()
        fixed.update()
    assert ema.shadow["w"].min().item() > 0.99  # a 100-step run exports its trained weights
    assert fixed.shadow["w"].max().item() < 0.1  # the fixed decay keeps > 90% of the initial zeros
    again = EMA({"w": p}, 0.999)
    again.load_state_dict(ema.state_dict())
    assert again.num_updates == 100 and again.current_decay() == ema.current_decay()
    old = {"w": ema.shadow["w"]}  # a checkpoint from before the count was saved: warm-up treated as over
    again.load_state_dict(old)
    assert again.current_decay() == 0.999
