"""Your own images and captions: a Parquet file / image folder -> `prepare_dataset` -> bridge training steps, the
planner writing missing plans (cached per planner, resumable), and bad input with errors that name it."""

import io
import json

import datasets
import numpy as np
import pytest
from peft import LoraConfig, get_peft_model
from PIL import Image
from tiny_models import save_tiny_planner, save_tiny_toy_base, tiny_bridge_config
from transformers import AutoModelForCausalLM

from alignment.bridge_training import BridgeTrainer
from alignment.prepared import (
    DataPrepError,
    cached_split,
    folder_fingerprint,
    load_prepared,
    prepare_dataset,
    square_image,
    written_plans,
)
from alignment.stages import config_from_dict
from plan2img.cli import main
from planner.planner import Planner
from toyworld import vocab as V
from toyworld.data import fresh_examples


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _photos(n: int, seed: int = 0) -> list[np.ndarray]:
    """Non-square RGB images of different sizes, as a user's photos would be."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 8 * (i % 3), 72 + 4 * (i % 2), 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    prompts, plans = fresh_examples("train", 12, seed=5)
    photos = _photos(12)
    table = datasets.Dataset.from_dict(
        {"img": [{"bytes": _png(a), "path": None} for a in photos], "caption": prompts, "layout_plan": plans}
    )
    table.to_parquet(str(root / "photos.parquet"))
    return {"root": root, "parquet": root / "photos.parquet", "prompts": prompts, "plans": plans}


def _prepare_user_data(user_data, out, **kw):
    """The fixture's Parquet file prepared with its own plans (its column names)."""
    args = dict(image_column="img", caption_column="caption", plan_column="layout_plan", spec=V.TOY_PLAN_SPEC)
    return prepare_dataset(user_data["parquet"], out, progress=False, **{**args, **kw})


def test_parquet_is_prepared_and_a_bridge_trains_on_it(user_data, tmp_path):
    out = _prepare_user_data(user_data, tmp_path / "prepared", resolution=64, center_crop=True)
    ds = load_prepared(out)
    assert len(ds) == 12 and set(ds["split"]) == {"train"}
    images, prompts, plans = cached_split(out, "train")
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8
    assert prompts == user_data["prompts"] and plans == user_data["plans"]
    base = save_tiny_toy_base(tmp_path / "base", prompts)
    stages = {"A": {"train": ["connector"], "steps": 2, "batch_size": 4}}
    cfg = config_from_dict(
        tiny_bridge_config(out, base, save_tiny_planner(tmp_path / "llm"), tmp_path / "run", stages)
    )
    BridgeTrainer(cfg, progress=False).run()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(row["total"]) for row in log)
    # ... and the trained bridge generates (the README's last step)
    args = ["generate", "a red circle", "-o", str(tmp_path / "out.png"), "--model", str(base), "--llm", cfg.planner]
    assert main(args + ["--bridge", str(tmp_path / "run" / "stage-A"), "--writer", "same", "--steps", "2"]) == 0
    assert Image.open(tmp_path / "out.png").size[0] > 0


def test_image_folder_with_metadata_and_random_crops_are_seeded(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    prompts, plans = fresh_examples("train", 4, seed=1)
    rows = []
    for i, (a, p, q) in enumerate(zip(_photos(4, seed=2), prompts, plans)):
        Image.fromarray(a).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": p, "plan": q}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    kw = dict(plan_column="plan", resolution=32, spec=V.TOY_PLAN_SPEC, progress=False, heldout_fraction=0.5, seed=3)
    a = prepare_dataset(folder, tmp_path / "a", **kw)
    b = prepare_dataset(folder, tmp_path / "b", **kw)
    ia, ib = load_prepared(a).with_format("numpy"), load_prepared(b).with_format("numpy")
    assert np.array_equal(np.stack(list(ia["image"])), np.stack(list(ib["image"])))
    assert list(ia["split"]) == list(ib["split"])
    assert ia["image"][0].shape == (32, 32, 3)


def test_square_image_centre_crop_keeps_the_middle():
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # a white middle third
    out = square_image(Image.fromarray(wide), 10, center_crop=True, rng=np.random.default_rng(0))
    assert out.shape == (10, 10, 3) and out.mean() > 250


def test_the_planner_writes_missing_plans_cached_per_planner_and_resumable(user_data, tmp_path):
    planner = Planner.from_pretrained(save_tiny_planner(tmp_path / "llm"), spec=V.TOY_PLAN_SPEC)
    key = folder_fingerprint(tmp_path / "llm")
    out = prepare_dataset(
        user_data["parquet"],
        tmp_path / "prepared",
        image_column="img",
        caption_column="caption",
        planner=planner,
        planner_key=key,
        batch_size=5,
        progress=False,
    )
    cache = tmp_path / f".plans-{key}-prepared.jsonl"
    lines = cache.read_text().splitlines()
    assert len(lines) == 12
    plans = list(load_prepared(out)["plan"])
    assert plans == [json.loads(line)["plan"] for line in lines]
    # a stopped run resumes: the cached rows are not planned again
    cache.write_text("\n".join(lines[:5]) + "\n")
    calls = []

    class Counting:
        def plan(self, prompts, batch_size):
            calls.append(len(prompts))
            return planner.plan(prompts, batch_size=batch_size)

    again = written_plans(user_data["prompts"], Counting(), cache, batch_size=5, progress=False)
    assert again == plans and calls == [5, 2]
    # another planner never reads this planner's cache
    with pytest.raises(DataPrepError, match="does not belong"):
        written_plans(user_data["prompts"][::-1], planner, cache, progress=False)


def _bad_parquet(tmp_path, **columns):
    path = tmp_path / f"bad{len(list(tmp_path.glob('bad*.parquet')))}.parquet"
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    return path


def test_bad_input_is_named(user_data, tmp_path):
    ok = {"image": [{"bytes": _png(_photos(1)[0]), "path": None}], "text": ["a red circle"]}
    plan = [user_data["plans"][0]]
    cases = [
        (_bad_parquet(tmp_path, **ok), {"caption_column": "caption", "plan_column": "plan"}, "no caption column"),
        (_bad_parquet(tmp_path, **ok, plan=plan), {"plan_column": "plan", "resolution": 4}, "resolution"),
        (_bad_parquet(tmp_path, **{**ok, "text": ["  "]}, plan=plan), {"plan_column": "plan"}, "row 0: empty caption"),
        (_bad_parquet(tmp_path, **ok, plan=["<IMG_BEGIN> nonsense"]), {"plan_column": "plan"}, "row 0: the plan"),
        (
            _bad_parquet(tmp_path, image=[{"bytes": b"not a png", "path": None}], text=["x"], plan=plan),
            {"plan_column": "plan"},
            "row 0, column 'image': unreadable image",
        ),
        (_bad_parquet(tmp_path, **ok), {}, "no plan column"),
        (tmp_path / "missing.parquet", {"plan_column": "plan"}, "does not exist"),
    ]
    for source, kw, message in cases:
        with pytest.raises(DataPrepError, match=message):
            prepare_dataset(source, tmp_path / "out", spec=V.TOY_PLAN_SPEC, progress=False, **kw)
        assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(DataPrepError, match="lacks columns"):
        load_prepared(_write_dataset(tmp_path / "plain", {"image": ["x"], "prompt": ["y"]}))


def _write_dataset(path, columns):
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def test_data_smaller_than_a_batch_fails_before_any_cache(user_data, tmp_path):
    out = _prepare_user_data(user_data, tmp_path / "prepared")
    base, llm = save_tiny_toy_base(tmp_path / "base", user_data["prompts"]), save_tiny_planner(tmp_path / "llm")
    stages = {"A": {"train": ["connector"], "steps": 1, "batch_size": 16}}
    cfg = config_from_dict(tiny_bridge_config(out, base, llm, tmp_path / "run", stages, connector="linear"))
    with pytest.raises(DataPrepError, match="12 training rows, fewer than one batch"):
        BridgeTrainer(cfg, progress=False)
    assert not (out / "cache").exists()


def test_cli_data_prepare(user_data, tmp_path, capsys):
    args = ["data", "prepare", str(user_data["parquet"]), "--out", str(tmp_path / "p"), "--image-column", "img"]
    assert main(args + ["--caption-column", "caption", "--plan-column", "layout_plan", "--resolution", "16"]) == 0
    assert load_prepared(tmp_path / "p").with_format("numpy")["image"][0].shape == (16, 16, 3)
    assert main(args[:3] + ["--out", str(tmp_path / "q"), "--caption-column", "nope", "--plan-column", "x"]) != 0
    assert "no image column 'image'" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_cli_plan_cache_is_named_after_every_model_that_writes(user_data, tmp_path):
    reader, other = save_tiny_planner(tmp_path / "a"), save_tiny_planner(tmp_path / "b", "qwen2")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(reader), LoraConfig(r=2, target_modules="all-linear"))
    lora.save_pretrained(str(tmp_path / "adapter"))
    base = ["data", "prepare", str(user_data["parquet"]), "--image-column", "img", "--caption-column", "caption"]
    runs = {"llm": [], "llm+adapter": ["--adapter", str(tmp_path / "adapter")], "writer": ["--writer", str(other)]}
    for name, extra in runs.items():
        assert main([*base, "--out", str(tmp_path / name.replace("+", "_")), "--llm", str(reader), *extra]) == 0
    keys = {c.name.split("-")[1] for c in tmp_path.glob(".plans-*.jsonl")}
    assert len(keys) == 3  # an adapter or another writer never reuses the LLM's plans
