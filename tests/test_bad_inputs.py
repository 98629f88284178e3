"""The bad-input suite: one table of cases across every command. Each case runs `plan2img` in-process and asserts
the exit code (2: a usage or input error, printed as one line naming the input), that the message names the input,
and that nothing was left half-written (no output, no temporary files). A bug would print a traceback and exit 1:
no case here may do that."""

from __future__ import annotations

import errno
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import safeio
from plan2img.cli import main
from toyworld.pretrained import pretrained_path

GOOD_PLAN = (
    "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 1 object, center <OBJECT> 1 medium red circle at center "
    "<COLOR> red <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>"
)


@dataclass
class Case:
    id: str
    argv: list[str]  # "{tmp}" is replaced by the case's folder
    says: tuple[str, ...]  # every one of these appears in stderr (the input's name, the problem)
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    code: int = 2
    absent: tuple[str, ...] = ("out.png", "out", "strip.png", "strip.json")  # under {tmp}: none may exist after
    slow: bool = field(default=False)  # loads the shipped models


# ------------------------------------------------------------------------------------------------- setups
def _copy_base(tmp: Path) -> Path:
    return Path(shutil.copytree(pretrained_path("base"), tmp / "base"))


def corrupt_unet(tmp: Path, mp) -> None:
    (_copy_base(tmp) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 16)


def pickled_unet(tmp: Path, mp) -> None:
    unet = _copy_base(tmp) / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, unet / "diffusion_pytorch_model.bin")


def truncated_bridge(tmp: Path, mp) -> None:
    bridge = Path(shutil.copytree(pretrained_path("bridge"), tmp / "bridge"))
    data = (bridge / "model.safetensors").read_bytes()
    (bridge / "model.safetensors").write_bytes(data[: len(data) // 3])


def empty_dpo_folder(tmp: Path, mp) -> None:
    (tmp / "dpo").mkdir()


def word_level_llm(tmp: Path, mp) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "a",
        "red",
        "circle",
        "blue",
        "square",
        "two",
        "above",
        "below",
        "the",
        "of",
        "and",
        "star",
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip
    fast.save_pretrained(tmp / "llm")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp / "llm")


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(tmp: Path, data: bytes) -> None:
    samples = tmp / "images" / "00000" / "samples"
    samples.mkdir(parents=True)
    (samples / "0000.png").write_bytes(data)


def truncated_png(tmp: Path, mp) -> None:
    _image_folder(tmp, _png(np.zeros((64, 64, 3), np.uint8))[:40])


def wrong_size_png(tmp: Path, mp) -> None:
    _image_folder(tmp, _png(np.zeros((17, 33, 3), np.uint8)))


def non_utf8_metadata(tmp: Path, mp) -> None:
    (tmp / "meta.jsonl").write_bytes(b'{"tag": "single_object", "prompt": "a red \xff circle"}\n')


def malformed_metadata(tmp: Path, mp) -> None:
    (tmp / "meta.jsonl").write_text('{"tag": "single_object", "prompt": "a red circle"\n')


def _prepare_source(tmp: Path, captions: bytes | None = None, image: bytes | None = None) -> None:
    src = tmp / "src"
    src.mkdir()
    if image is not None:
        (src / "a.png").write_bytes(image)
    line = captions if captions is not None else json.dumps({"file_name": "a.png", "text": "a red circle"}).encode()
    (src / "metadata.jsonl").write_bytes(line + b"\n")


def prepare_non_utf8(tmp: Path, mp) -> None:
    _prepare_source(tmp, b'{"file_name": "a.png", "text": "a red \xff circle"}', _png(np.zeros((64, 64, 3), np.uint8)))


def prepare_missing_image(tmp: Path, mp) -> None:
    _prepare_source(tmp)


def prepare_truncated_image(tmp: Path, mp) -> None:
    _prepare_source(tmp, image=_png(np.zeros((64, 64, 3), np.uint8))[:30])


def _yaml(tmp: Path, text: str) -> None:
    (tmp / "cfg.yaml").write_text(text)


def yaml_unknown_key(tmp: Path, mp) -> None:
    _yaml(tmp, "data: data/toy50k\nlearning_rate: 0.1\n")


def yaml_wrong_type(tmp: Path, mp) -> None:
    _yaml(tmp, "stages:\n  A: {train: [connector], steps: 10, lr: fast}\n")


def yaml_negative_steps(tmp: Path, mp) -> None:
    _yaml(tmp, "stages:\n  A: {train: [connector], steps: -5}\n")


def yaml_broken(tmp: Path, mp) -> None:
    _yaml(tmp, "data: [unclosed\n")


def yaml_not_mapping(tmp: Path, mp) -> None:
    _yaml(tmp, "- just\n- a list\n")


def yaml_control_chars(tmp: Path, mp) -> None:
    (tmp / "cfg.yaml").write_bytes(b"data: \x00\x01\n")


def _pairs(tmp: Path, rows: list[dict]) -> None:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp / "pairs.parquet"))


def _pair(**over) -> dict:
    img = _png(np.zeros((64, 64, 3), np.uint8))
    return {"caption": "a red circle", "jpg_0": img, "jpg_1": img, "label_0": 1.0, "label_1": 0.0, **over}


def pairs_bad_label(tmp: Path, mp) -> None:
    _pairs(tmp, [_pair(), _pair(label_0=0.3, label_1=0.7)])


def pairs_missing_column(tmp: Path, mp) -> None:
    _pairs(tmp, [{k: v for k, v in _pair().items() if k != "jpg_1"}])


def pairs_undecodable(tmp: Path, mp) -> None:
    _pairs(tmp, [_pair(), _pair(jpg_0=b"not an image")])


def pairs_empty(tmp: Path, mp) -> None:
    (tmp / "pairs.parquet").write_bytes(b"")


def full_disk(tmp: Path, mp) -> None:
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(safeio.os, "fsync", no_space)


def out_is_a_folder(tmp: Path, mp) -> None:
    (tmp / "taken.png").mkdir()


def nan_loss(tmp: Path, mp) -> None:
    """A real (tiny) training run whose diffusion loss turns NaN at its first step."""
    from tiny_models import save_tiny_planner, save_tiny_toy_base, tiny_bridge_config

    from toyworld.data import build_dataset, load_dataset_dir

    build_dataset(tmp / "data", n=16, seed=0, workers=1, progress=False)
    base = save_tiny_toy_base(tmp / "base", list(load_dataset_dir(tmp / "data")["prompt"]))
    planner = save_tiny_planner(tmp / "llm")
    stages = {"A": {"train": ["connector"], "steps": 3, "batch_size": 4}}
    (tmp / "cfg.yaml").write_text(json.dumps(tiny_bridge_config(tmp / "data", base, planner, tmp / "out", stages)))
    import alignment.bridge_training as training

    real = training.diffusion_loss
    mp.setattr(training, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))


# --------------------------------------------------------------------------------------------------- cases
P = "two blue squares above a red star"
OUT = ["-o", "{tmp}/out.png"]
CASES = [
    # generate: prompts
    Case("generate-empty-prompt", ["generate", "", *OUT], ("prompt is empty",)),
    Case("generate-whitespace-prompt", ["generate", " \t\n ", *OUT], ("prompt is empty",)),
    Case("generate-100k-prompt", ["generate", "a red circle " * 7700, *OUT], ("prompt has", "characters")),
    Case("generate-control-char", ["generate", "a red\x00 circle", *OUT], ("prompt", "control character")),
    Case("generate-surrogate", ["generate", "a red \udcff circle", *OUT], ("prompt", "U+DCFF")),
    Case(
        "generate-unknown-device", ["generate", "a red circle", *OUT, "--device", "gpu0"], ("--device", "not a device")
    ),
    Case(
        "generate-cuda-absent",
        ["generate", "a red circle", *OUT, "--device", "cuda"],
        ("--device cuda", "CUDA is not available"),
        setup=lambda tmp, mp: mp.setattr(torch.cuda, "is_available", lambda: False),
    ),
    # generate: numeric options
    Case("generate-guidance-nan", ["generate", P, "--guidance", "nan", *OUT], ("--guidance", "finite")),
    Case("generate-guidance-inf", ["generate", P, "--guidance", "inf", *OUT], ("--guidance",)),
    Case("generate-n-negative", ["generate", P, "--n", "-3", *OUT], ("--n", "-3")),
    Case("generate-n-huge", ["generate", P, "--n", "100000", *OUT], ("--n",)),
    Case("generate-steps-zero", ["generate", P, "--steps", "0", *OUT], ("--steps",)),
    Case("generate-steps-word", ["generate", P, "--steps", "many", *OUT], ("--steps", "integer")),
    Case("generate-seed-negative", ["generate", P, "--seed", "-1", *OUT], ("--seed",)),
    Case("generate-scale-zero", ["generate", P, "--scale", "0", *OUT], ("--scale",)),
    Case("generate-sampler-unknown", ["generate", P, "--sampler", "magic", *OUT], ("--sampler", "magic")),
    # generate: plans
    Case(
        "generate-plan-truncated", ["generate", P, "--plan", "<IMG_BEGIN> <STYLE> plain", *OUT], ("plan",), slow=True
    ),  # fmt: skip
    Case(
        "generate-plan-no-markers", ["generate", P, "--plan", "a red circle", *OUT], ("plan", "IMG_BEGIN"), slow=True
    ),  # fmt: skip
    Case(
        "generate-plan-bad-word",
        ["generate", P, "--plan", GOOD_PLAN.replace("plain background", "zebra"), *OUT],
        ("STYLE", "zebra"),
        slow=True,
    ),  # fmt: skip
    # generate: models and checkpoints
    Case("generate-model-missing", ["generate", P, "--model", "{tmp}/nothing", *OUT], ("nothing",)),
    Case(
        "generate-model-corrupt",
        ["generate", P, "--model", "{tmp}/base", *OUT],
        ("diffusion_pytorch_model",),
        setup=corrupt_unet,
        slow=True,
    ),  # fmt: skip
    Case(
        "generate-model-pickled",
        ["generate", P, "--model", "{tmp}/base", *OUT],
        ("unet", "pickle"),
        setup=pickled_unet,
        slow=True,
    ),  # fmt: skip
    Case("generate-bridge-missing", ["generate", P, "--bridge", "{tmp}/nobridge", *OUT], ("nobridge",), slow=True),
    Case(
        "generate-bridge-truncated",
        ["generate", P, "--bridge", "{tmp}/bridge", *OUT],
        ("bridge",),
        setup=truncated_bridge,
        slow=True,
    ),  # fmt: skip
    Case(
        "generate-unet-dpo-empty",
        ["generate", P, "--unet-dpo", "{tmp}/dpo", *OUT],
        ("dpo", "unet_dpo"),
        setup=empty_dpo_folder,
        slow=True,
    ),  # fmt: skip
    Case(
        "generate-llm-bridge-mismatch",
        ["generate", P, "--llm", "{tmp}/llm", "--writer", "same", *OUT],
        ("LLM width",),
        setup=word_level_llm,
        slow=True,
    ),  # fmt: skip
    # generate: output
    Case(
        "generate-full-disk",
        ["generate", P, "--steps", "2", *OUT],
        ("out.png", "No space left"),
        setup=full_disk,
        slow=True,
    ),  # fmt: skip
    Case(
        "generate-output-is-folder",
        ["generate", P, "--steps", "2", "-o", "{tmp}/taken.png"],
        ("taken.png",),
        setup=out_is_a_folder,
        slow=True,
    ),  # fmt: skip
    # plan
    Case("plan-empty", ["plan", ""], ("prompt #0 is empty",)),
    Case("plan-huge", ["plan", "x" * 100_000], ("characters",)),
    Case(
        "plan-word-level-llm",
        ["plan", P, "--llm", "{tmp}/llm", "--writer", "same"],
        ("cannot spell", "--free-plan"),
        setup=word_level_llm,
    ),  # fmt: skip
    Case("plan-llm-missing", ["plan", P, "--llm", "{tmp}/nollm"], ("nollm",)),
    # refine
    Case("refine-empty", ["refine", "  ", "-o", "{tmp}/strip.png"], ("prompt is empty",)),
    Case("refine-rounds-zero", ["refine", P, "--rounds", "0", "-o", "{tmp}/strip.png"], ("--rounds",)),
    Case(
        "refine-critic-missing",
        ["refine", P, "--critic", "{tmp}/nocritic", "-o", "{tmp}/strip.png"],
        ("nocritic",),
        slow=True,
    ),  # fmt: skip
    Case(
        "refine-reviser-missing",
        ["refine", P, "--reviser", "{tmp}/noreviser", "-o", "{tmp}/strip.png"],
        ("noreviser",),
        slow=True,
    ),  # fmt: skip
    Case("refine-unknown-move", ["refine", P, "--moves", "reseed,teleport", "-o", "{tmp}/strip.png"], ("teleport",)),
    Case(
        "refine-bad-plan",
        ["refine", P, "--plan", "<IMG_BEGIN> <OBJECT>", "-o", "{tmp}/strip.png"],
        ("plan",),
        slow=True,
    ),  # fmt: skip
    # eval
    Case("eval-images-missing", ["eval", "--images", "{tmp}/none", "--out", "{tmp}/out"], ("none", "does not exist")),
    Case(
        "eval-truncated-png",
        ["eval", "--images", "{tmp}/images", "--limit-per-task", "1", "--out", "{tmp}/out"],
        ("0000.png",),
        setup=truncated_png,
    ),  # fmt: skip
    Case(
        "eval-wrong-size-png",
        ["eval", "--images", "{tmp}/images", "--limit-per-task", "1", "--out", "{tmp}/out"],
        ("0000.png", "17"),
        setup=wrong_size_png,
    ),  # fmt: skip
    Case(
        "eval-metadata-non-utf8",
        ["eval", "--metadata", "{tmp}/meta.jsonl", "--ground-truth", "--out", "{tmp}/out"],
        ("meta.jsonl", "UTF-8"),
        setup=non_utf8_metadata,
    ),  # fmt: skip
    Case(
        "eval-metadata-malformed",
        ["eval", "--metadata", "{tmp}/meta.jsonl", "--ground-truth", "--out", "{tmp}/out"],
        ("meta.jsonl", "line 1"),
        setup=malformed_metadata,
    ),  # fmt: skip
    Case(
        "eval-best-of-and-refine",
        [
            "eval",
            "--generate",
            "bridge",
            "--best-of",
            "2",
            "--refine",
            "2",
            "--limit-per-task",
            "1",
            "--out",
            "{tmp}/out",
        ],
        ("--best-of", "--refine"),
        slow=True,
    ),  # fmt: skip
    Case(
        "eval-n-per-prompt-zero",
        ["eval", "--generate", "bridge", "--n-per-prompt", "0", "--out", "{tmp}/out"],
        ("--n-per-prompt",),
    ),  # fmt: skip
    Case("eval-no-source", ["eval", "--out", "{tmp}/out"], ("--images", "--ground-truth", "--generate")),
    # data build / prepare
    Case("data-build-n-zero", ["data", "build", "--out", "{tmp}/out", "--n", "0"], ("--n",)),
    Case(
        "data-build-heldout-2",
        ["data", "build", "--out", "{tmp}/out", "--heldout-fraction", "2"],
        ("--heldout-fraction",),
    ),  # fmt: skip
    Case("prepare-source-missing", ["data", "prepare", "{tmp}/nosrc", "--out", "{tmp}/out"], ("nosrc",)),
    Case(
        "prepare-non-utf8-captions",
        ["data", "prepare", "{tmp}/src", "--out", "{tmp}/out"],
        ("metadata.jsonl",),
        setup=prepare_non_utf8,
    ),  # fmt: skip
    Case(
        "prepare-missing-image",
        ["data", "prepare", "{tmp}/src", "--out", "{tmp}/out"],
        ("a.png",),
        setup=prepare_missing_image,
    ),  # fmt: skip
    Case(
        "prepare-truncated-image",
        ["data", "prepare", "{tmp}/src", "--out", "{tmp}/out"],
        ("a.png",),
        setup=prepare_truncated_image,
    ),  # fmt: skip
    # train
    Case("train-config-missing", ["train", "--config", "{tmp}/none.yaml"], ("none.yaml",)),
    Case(
        "train-unknown-key",
        ["train", "--config", "{tmp}/cfg.yaml"],
        ("learning_rate", "unknown"),
        setup=yaml_unknown_key,
    ),  # fmt: skip
    Case("train-wrong-type", ["train", "--config", "{tmp}/cfg.yaml"], ("lr", "'fast'"), setup=yaml_wrong_type),
    Case("train-negative-steps", ["train", "--config", "{tmp}/cfg.yaml"], ("steps", "-5"), setup=yaml_negative_steps),
    Case("train-broken-yaml", ["train", "--config", "{tmp}/cfg.yaml"], ("cfg.yaml", "YAML"), setup=yaml_broken),
    Case("train-yaml-list", ["train", "--config", "{tmp}/cfg.yaml"], ("cfg.yaml", "mapping"), setup=yaml_not_mapping),
    Case("train-yaml-control-chars", ["train", "--config", "{tmp}/cfg.yaml"], ("cfg.yaml",), setup=yaml_control_chars),
    Case("train-set-nan", ["train", "--config", "configs/toy_A.yaml", "--set", "seed=.nan"], ("seed",)),
    Case("train-set-malformed", ["train", "--config", "configs/toy_A.yaml", "--set", "seed"], ("--set", "seed")),
    # dpo
    Case(
        "dpo-bad-label",
        ["dpo", "--config", "configs/toy_dpo.yaml", "--set", "pairs={tmp}/pairs.parquet", "out={tmp}/out"],
        ("row 1", "label_0"),
        setup=pairs_bad_label,
        slow=True,
    ),  # fmt: skip
    Case(
        "dpo-missing-column",
        ["dpo", "--config", "configs/toy_dpo.yaml", "--set", "pairs={tmp}/pairs.parquet", "out={tmp}/out"],
        ("jpg_1",),
        setup=pairs_missing_column,
        slow=True,
    ),  # fmt: skip
    Case(
        "dpo-undecodable",
        ["dpo", "--config", "configs/toy_dpo.yaml", "--set", "pairs={tmp}/pairs.parquet", "out={tmp}/out"],
        ("row 1", "jpg_0"),
        setup=pairs_undecodable,
        slow=True,
    ),  # fmt: skip
    Case(
        "dpo-empty-file",
        ["dpo", "--config", "configs/toy_dpo.yaml", "--set", "pairs={tmp}/pairs.parquet", "out={tmp}/out"],
        ("pairs.parquet",),
        setup=pairs_empty,
        slow=True,
    ),  # fmt: skip
    Case(
        "train-nan-loss",
        ["train", "--config", "{tmp}/cfg.yaml"],
        ("is nan at step 0", "batch rows"),
        setup=nan_loss,
        absent=("out/final",),
    ),  # fmt: skip
    Case(
        "dpo-beta-negative",
        ["dpo", "--config", "configs/toy_dpo.yaml", "--set", "beta=-1", "out={tmp}/out"],
        ("beta", "-1"),
    ),  # fmt: skip
    Case(
        "dpo-target-unknown",
        ["dpo", "--config", "configs/toy_dpo.yaml", "--set", "target=vae", "out={tmp}/out"],
        ("target", "vae"),
    ),  # fmt: skip
    Case(
        "dpo-soup-one-folder",
        ["dpo-soup", "{tmp}/dpo", "--out", "{tmp}/out"],
        ("at least two",),
        setup=empty_dpo_folder,
    ),  # fmt: skip
    Case(
        "dpo-soup-empty-folder",
        ["dpo-soup", "{tmp}/dpo", "{tmp}/dpo", "--out", "{tmp}/out"],
        ("dpo", "unet_dpo"),
        setup=empty_dpo_folder,
    ),  # fmt: skip
    # serve (each fails before a server starts)
    Case("serve-port-zero", ["serve", "--port", "0"], ("--port",)),
    Case("serve-port-word", ["serve", "--port", "http"], ("--port", "integer")),
    Case("serve-max-images-zero", ["serve", "--max-images", "0"], ("--max-images",)),
    Case("serve-bridge-missing", ["serve", "--bridge", "{tmp}/nobridge"], ("nobridge",), slow=True),
]


def _leftovers(tmp: Path) -> list[Path]:
    return [p for p in tmp.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys, monkeypatch) -> None:
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]  # the one line that says what is wrong
    for needle in case.says:
        assert needle in message, f"{needle!r} not in {message!r}"
    for name in case.absent:
        assert not (tmp_path / name).exists() or (tmp_path / name).is_dir() and name == "taken.png", name
    assert not _leftovers(tmp_path)


def test_the_suite_covers_every_command_with_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    commands = {c.argv[0] if c.argv[0] != "data" else " ".join(c.argv[:2]) for c in CASES}
    assert {"generate", "plan", "eval", "data build", "data prepare", "train", "refine", "dpo", "serve"} <= commands


def test_a_bug_is_not_caught_so_python_prints_its_traceback_and_exits_1(monkeypatch) -> None:
    """A plain ValueError is not our input-error class: a bug. main() lets it through (Python then prints the
    traceback and exits 1) instead of turning it into a one-line exit 2."""
    import plan2img.cli as cli

    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "_cmd_plan", broken)
    with pytest.raises(ValueError, match="invariant"):
        main(["plan", "a red circle"])
