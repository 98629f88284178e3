"""The models shipped in toyworld/pretrained/ load, fit the size budget, and run the default commands."""

import json

import numpy as np
from PIL import Image

from toyworld.pretrained import PRETRAINED_DIR, pretrained_path

SIZE_BUDGET = 40 * 1024 * 1024  # all shipped weights together


def test_manifest_lists_every_shipped_model_within_budget():
    manifest = json.loads((PRETRAINED_DIR / "MANIFEST.json").read_text())
    for name in ("base", "planner", "planner_wide", "bridge"):
        assert name in manifest, f"{name} is not shipped"
        assert pretrained_path(name).is_dir()
        assert not list(pretrained_path(name).rglob("*.bin")), "pickled weights shipped"
    assert manifest["total_bytes"] <= SIZE_BUDGET
    on_disk = sum(f.stat().st_size for f in PRETRAINED_DIR.rglob("*") if f.is_file() and f.parent != PRETRAINED_DIR)
    assert on_disk <= SIZE_BUDGET


def test_default_generate_plan_and_native(tmp_path, capsys):
    from plan2img.cli import main

    assert main(["plan", "two blue squares above a red star", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan.startswith("<IMG_BEGIN>") and plan.endswith("<IMG_END>")
    for flags, name in (([], "bridge.png"), (["--native"], "native.png")):
        out = tmp_path / name
        assert main(["generate", "two blue squares above a red star", "-o", str(out), "--steps", "3", *flags]) == 0
        img = np.asarray(Image.open(out).convert("RGB"))
        assert img.shape == (64, 64, 3) and img.std() > 0


def test_shipped_writer_is_a_lora_adapter_over_the_shipped_planner():
    from planner.planner import Planner, is_adapter_dir
    from toyworld.vocab import TOY_PLAN_SPEC

    adapter = pretrained_path("planner_wide")
    assert is_adapter_dir(adapter) and not list(adapter.rglob("*.bin"))
    writer = Planner.from_pretrained(pretrained_path("planner"), adapter=adapter, spec=TOY_PLAN_SPEC)
    reader = Planner.from_pretrained(pretrained_path("planner"), spec=TOY_PLAN_SPEC)
    ids = reader.tokenizer("a star with a circle to its left", return_tensors="pt").input_ids
    assert not np.allclose(writer.model(ids).logits.detach(), reader.model(ids).logits.detach(), atol=1e-3)
    assert writer.plan(["two blue squares above a red star"])[0].plan is not None


def test_shipped_training_config_runs_from_any_directory(tmp_path, monkeypatch):
    from plan2img.cli import main
    from toyworld.data import build_dataset

    config = (PRETRAINED_DIR.parent.parent / "configs" / "toy_A.yaml").resolve()
    build_dataset(tmp_path / "data", n=40, seed=1, workers=1, progress=False)
    monkeypatch.chdir(tmp_path)  # the config names toyworld/pretrained/... relative to the repository
    args = ["train", "--config", str(config), "--set", "data=data", "out=run", "stop_at=1", "log_every=1"]
    assert main(args) == 0
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1


def _devices(models: dict) -> dict:
    return {name: {t.device.type for t in (*m.parameters(), *m.buffers())} for name, m in models.items()}


def test_cli_places_every_model_on_the_device_asked_for_and_pipelines_move():
    """``--device`` reaches every model a command loads, and ``pipe.to(device)`` moves every model of a loaded
    pipeline (meta: placement only, nothing runs). The default is the CPU."""
    from diffusion_backbone.pipeline import TextToImagePipeline
    from llm_bridge.native_layout import NativeLayoutPipeline
    from plan2img import cli

    base = ["generate", "a red circle"]
    assert cli._device(cli.build_parser().parse_args(base)) == "cpu"
    for how in ("--device", "pipe.to"):
        args = cli.build_parser().parse_args([*base, "--device", "meta"] if how == "--device" else base)
        pipe, critic = cli._load_bridge_pipeline(args), cli._load_critic(args)
        if how == "pipe.to":
            assert pipe.backbone.unet.device.type == "cpu"
            pipe.to("meta")
            critic.model.to("meta")
        models = {
            "reader LLM": pipe.planner.model,
            "writer LLM": pipe.writer.model,
            "bridge": pipe.bridge,
            "U-Net": pipe.backbone.unet,
            "VAE": pipe.backbone.vae,
            "text encoder": pipe.backbone.text_encoder.model,
            "critic": critic.model,
        }
        assert pipe.writer is not pipe.planner  # the shipped chain: two LLMs, both placed
        assert _devices(models) == dict.fromkeys(models, {"meta"}), how
    native = TextToImagePipeline(cli._load_base(None)).to("meta")
    layout = NativeLayoutPipeline(pipe.writer, native.backbone).to("meta")
    models = {"U-Net": layout.backbone.unet, "text encoder": layout.backbone.text_encoder.model}
    assert _devices(models) == dict.fromkeys(models, {"meta"})
