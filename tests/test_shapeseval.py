"""ShapesEval: metadata format, the detector on hard cases, the scorer on ground truth, CLI bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from plan2img.cli import main
from toyworld import vocab as V
from toyworld.eval.detector import detect
from toyworld.eval.metadata import (
    DEFAULT_PER_TASK,
    FIELD_TASKS,
    GENEVAL_TASKS,
    MetadataError,
    make_metadata,
    read_metadata,
    validate_entry,
)
from toyworld.eval.runner import PACKAGE_METADATA, ground_truth_generator, score_generator
from toyworld.eval.scoring import paired_difference, summarize
from toyworld.render import degrade, render
from toyworld.scene import Instance, Scene


def test_shipped_metadata_is_reproducible_and_complete():
    for split, path in PACKAGE_METADATA.items():
        lines = path.read_text().splitlines()
        assert lines == [json.dumps(e) for e in make_metadata(split=split, seed=0)]
        entries = read_metadata(path)
        counts = {}
        for e in entries:
            counts[e["tag"]] = counts.get(e["tag"], 0) + 1
        for t in GENEVAL_TASKS:
            assert counts[t] >= 100
        for t in FIELD_TASKS:
            assert counts[t] >= 50
        assert counts == DEFAULT_PER_TASK


def test_metadata_follows_geneval_format():
    entries = make_metadata(per_task={t: 5 for t in DEFAULT_PER_TASK})
    by_tag = {}
    for e in entries:
        by_tag.setdefault(e["tag"], e)
        assert set(e) >= {"tag", "include", "prompt"}
        for req in e["include"]:
            assert req["class"] in V.SHAPES and isinstance(req["count"], int)
    assert by_tag["counting"]["exclude"][0]["count"] == by_tag["counting"]["include"][0]["count"] + 1
    rel, idx = by_tag["position"]["include"][1]["position"]
    assert rel in ("left of", "right of", "above", "below") and idx == 0
    assert all("color" in r for r in by_tag["color_attr"]["include"])
    assert "color" in by_tag["colors"]["include"][0]
    for t in FIELD_TASKS:
        assert t in by_tag[t]["scene"]


def test_heldout_metadata_uses_heldout_families():
    from toyworld.grammar import FAMILY_BY_NAME

    for split in ("heldout", "train"):
        assert {FAMILY_BY_NAME[e["family"]].split for e in make_metadata(split=split)} == {split}


def test_wide_metadata_adds_widened_training_wordings_and_only_for_train():
    from toyworld.grammar import FAMILY_BY_NAME

    entries = make_metadata(split="train", wide=True, per_task={"style": 40})
    fams = [FAMILY_BY_NAME[e["family"]] for e in entries]
    assert {f.split for f in fams} == {"train"} and any(f.wide for f in fams) and not all(f.wide for f in fams)
    assert make_metadata(split="train", per_task={"style": 40}) != entries  # the default grammar is unchanged
    with pytest.raises(ValueError, match="split must be 'train'"):
        make_metadata(split="heldout", wide=True)


def test_cli_metadata_wide_writes_training_wordings_and_refuses_heldout(tmp_path, capsys):
    from toyworld.grammar import FAMILY_BY_NAME

    out = tmp_path / "wide.jsonl"
    assert main(["metadata", "--split", "train", "--wide", "--out", str(out)]) == 0
    families = {json.loads(line)["family"] for line in out.read_text().splitlines()}
    assert any(FAMILY_BY_NAME[f].wide for f in families)
    assert main(["metadata", "--wide", "--out", str(tmp_path / "bad.jsonl")]) == 2  # the default split is heldout
    assert "--split train" in capsys.readouterr().err and not (tmp_path / "bad.jsonl").exists()


@pytest.mark.parametrize(
    "entry, words",
    [
        ([1, 2], "JSON object"),
        ({"include": [{"class": "circle"}], "prompt": "x"}, "tag"),
        ({"tag": "t", "include": [{"class": "cat", "count": 1}], "prompt": "x"}, "class 'cat'"),
        ({"tag": "t", "include": [{"class": "circle", "count": 0}], "prompt": "x"}, "count 0"),
        ({"tag": "t", "include": [{"class": "circle", "color": "pink"}], "prompt": "x"}, "color 'pink'"),
        ({"tag": "t", "include": [{"class": "circle", "position": ["left of", 0]}], "prompt": "x"}, "position"),
        ({"tag": "t", "include": [{"class": "circle"}], "prompt": "x", "scene": {"lighting": "disco"}}, "disco"),
        ({"tag": "t", "include": [{"class": "circle"}], "prompt": "  "}, "prompt"),
    ],
)
def test_validate_entry_names_the_fault(entry, words):
    with pytest.raises(MetadataError, match=words):
        validate_entry(entry, "line 3")


def _scene(instances, lighting="normal", style="plain", tint=(0.92, 0.91, 0.9)):
    return Scene(tuple(instances), style, lighting, "medium", instances[0].material, tint, True)


def _found(det):
    return sorted((o.shape, o.color) for o in det.objects)


@pytest.mark.parametrize("degradation", ["none", "blur-noise"])
def test_detector_touching_objects_of_different_colors(degradation):
    rng = np.random.default_rng(0)
    # pairs of shapes whose boxes touch (gap 0) or overlap by a pixel
    for gap in (0.0, -1.0):
        for a, b in [("circle", "square"), ("star", "triangle"), ("square", "square"), ("circle", "star")]:
            ext = 20.0
            x1 = 32 - ext / 2 - gap / 2
            x2 = 32 + ext / 2 + gap / 2
            scene = _scene(
                [
                    Instance(a, "red", "medium", "solid", x1, 32, ext),
                    Instance(b, "yellow", "medium", "solid", x2, 32, ext),
                ]
            )
            det = detect(degrade(render(scene), degradation, rng))
            assert _found(det) == sorted([(a, "red"), (b, "yellow")]), (a, b, gap, _found(det))


@pytest.mark.parametrize("degradation", ["none", "blur-noise"])
def test_detector_small_objects(degradation):
    rng = np.random.default_rng(1)
    small = V.SIZES["small"] * V.CAMERA["wide"]
    for shape in V.SHAPES:
        for color in V.COLORS:
            scene = _scene([Instance(shape, color, "small", "solid", 32, 32, small)])
            det = detect(degrade(render(scene), degradation, rng))
            assert _found(det) == [(shape, color)], (shape, color, _found(det))


@pytest.mark.parametrize("degradation", ["none", "blur-noise"])
def test_detector_low_brightness_and_outlines(degradation):
    rng = np.random.default_rng(2)
    for shape in V.SHAPES:
        for color in V.COLORS:
            scene = _scene(
                [
                    Instance(shape, color, "medium", "outlined", 20, 20, 20.0),
                    Instance(shape, color, "medium", "outlined", 44, 44, 20.0),
                ],
                lighting="dim",
                style="vignette",
                tint=(0.88, 0.86, 0.8),
            )
            det = detect(degrade(render(scene), degradation, rng))
            assert _found(det) == [(shape, color)] * 2, (shape, color, _found(det))
            assert {o.material for o in det.objects} == {"outlined"}
            assert det.lighting == "dim" and det.style == "vignette"


def test_detector_rejects_non_images():
    with pytest.raises(ValueError, match="RGB array"):
        detect(np.zeros((64, 64)))


def test_blank_image_has_no_objects():
    det = detect(np.full((64, 64, 3), 200, np.uint8))
    assert det.objects == [] and det.style == "plain" and det.scale is None


@pytest.mark.parametrize("degradation, floor", [("none", 0.995), ("blur-noise", 0.97)])
def test_scorer_on_ground_truth_sample(degradation, floor):
    entries = read_metadata(PACKAGE_METADATA["heldout"])
    sample = [e for i, e in enumerate(entries) if i % 8 == 0]  # 100 prompts covering every task
    results, _ = score_generator(sample, ground_truth_generator(degradation), n_per_prompt=2, progress=False)
    summary = summarize(results, n_boot=200)
    assert len(summary["tasks"]) == 10
    assert summary["overall"] >= floor
    if degradation == "none":
        assert min(t["score"] for t in summary["tasks"].values()) >= floor


def test_scorer_fails_wrong_images():
    """The scorer can fail: each prompt scored against another task's ground truth mostly fails."""
    entries = read_metadata(PACKAGE_METADATA["heldout"])
    sample = [e for i, e in enumerate(entries) if i % 8 == 0]
    shifted = sample[1:] + sample[:1]
    gen = ground_truth_generator("none")

    def wrong(prompts, batch, seeds):
        idx = [sample.index(e) for e in batch]
        return gen(prompts, [shifted[i] for i in idx], seeds)

    results, _ = score_generator(sample, wrong, n_per_prompt=1, progress=False)
    assert summarize(results, n_boot=10)["overall"] < 0.6


def _write_folder(root, images):
    for (i, k), img in images.items():
        d = root / f"{i:05d}" / "samples"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{k:04d}.png")


@pytest.fixture
def small_eval(tmp_path):
    entries = read_metadata(PACKAGE_METADATA["heldout"])[:3]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(e) + "\n" for e in entries))
    gen = ground_truth_generator("none")
    images = {(i, k): gen([e["prompt"]], [e], [i * 10 + k])[0] for i, e in enumerate(entries) for k in range(2)}
    folder = tmp_path / "images"
    _write_folder(folder, images)
    return meta, folder, tmp_path / "out"


def test_cli_eval_scores_a_folder(small_eval, capsys):
    meta, folder, out = small_eval
    assert main(["eval", "--metadata", str(meta), "--images", str(folder), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"] == 1.0 and summary["n_images"] == 6
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    assert "overall" in capsys.readouterr().out


def _assert_fails(args, words, out, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert not out.exists()  # nothing partial


def test_cli_eval_missing_folder(small_eval, capsys):
    meta, folder, out = small_eval
    missing = folder.parent / "nope"
    _assert_fails(
        ["eval", "--metadata", str(meta), "--images", str(missing), "--out", str(out)], str(missing), out, capsys
    )


def test_cli_eval_unreadable_image(small_eval, capsys):
    meta, folder, out = small_eval
    bad = folder / "00001" / "samples" / "0001.png"
    bad.write_bytes(b"not a png at all")
    _assert_fails(["eval", "--metadata", str(meta), "--images", str(folder), "--out", str(out)], str(bad), out, capsys)


def test_cli_eval_wrong_size_image(small_eval, capsys):
    meta, folder, out = small_eval
    bad = folder / "00002" / "samples" / "0000.png"
    Image.new("RGB", (32, 32)).save(bad)
    _assert_fails(["eval", "--metadata", str(meta), "--images", str(folder), "--out", str(out)], "32x32", out, capsys)


def test_cli_eval_malformed_metadata_line(small_eval, capsys):
    meta, folder, out = small_eval
    lines = meta.read_text().splitlines()
    lines[1] = lines[1][:-5]
    meta.write_text("\n".join(lines) + "\n")
    _assert_fails(["eval", "--metadata", str(meta), "--images", str(folder), "--out", str(out)], "line 2", out, capsys)


def test_cli_eval_index_beyond_metadata(small_eval, capsys):
    meta, folder, out = small_eval
    _write_folder(folder, {(9, 0): np.zeros((64, 64, 3), np.uint8)})
    _assert_fails(["eval", "--metadata", str(meta), "--images", str(folder), "--out", str(out)], "00009", out, capsys)


def test_cli_ground_truth(tmp_path, capsys):
    out = tmp_path / "gt"
    assert (
        main(
            [
                "eval",
                "--ground-truth",
                "--limit-per-task",
                "2",
                "--n-per-prompt",
                "1",
                "--out",
                str(out),
                "--save-images",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"] == 1.0 and summary["n_images"] == 20
    assert len(list((out / "images").glob("*/samples/*.png"))) == 20


def test_paired_difference():
    def results(correct_by_prompt):
        return [
            {"tag": tag, "prompt_index": i, "correct": c}
            for tag in ("counting", "colors")
            for i, cs in enumerate(correct_by_prompt)
            for c in cs
        ]

    a = results([[True, False], [False, False], [True, True], [False, True]])  # 0.5 per task
    b = results([[True, True], [True, False], [True, True], [True, True]])  # 0.875 per task
    d = paired_difference(a, b, n_boot=200)
    assert d["difference"] == pytest.approx(0.375)
    assert d["ci95"][0] <= 0.375 <= d["ci95"][1] and d["ci95"][0] > 0  # b never loses on a prompt
    assert paired_difference(a, a, n_boot=50)["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(a, results([[True]]), n_boot=10)
