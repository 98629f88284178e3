"""Diffusion-DPO's loss (invariances from the paper's equation) and the Pick-a-Pic pair loader."""

import dataclasses
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import load_script, save_tiny_planner, tiny_scheduler, tiny_unet, tiny_vae

import alignment
from alignment.dpo import (
    ConnectorConditioning,
    DPOTrainConfig,
    FixedConditioning,
    _Trained,
    adapters_disabled,
    add_unet_lora,
    dpo_step_losses,
    dpo_timesteps,
    load_unet_dpo,
    pair_errors,
    save_dpo,
    soup_unet_dpo,
    split_pairs,
    train_unet_dpo,
)
from alignment.loop import make_optimizer
from alignment.losses import diffusion_dpo_loss
from alignment.planner_dpo import PlannerDPOConfig, all_plan_pairs, plan_pairs, train_planner_dpo
from alignment.preference import PairWriter, contrast_plan_pairs, self_play_plan_pairs
from alignment.prepared import DataPrepError
from diffusion_backbone.conditioning import Conditioning
from diffusion_backbone.injection import time_embedding_dim
from diffusion_backbone.sampling import unet_forward
from llm_bridge.bridge import LLMBridge
from llm_bridge.connector import ConnectorConfig
from planner.planner import Planner
from planner.reviser import reviser_stack
from planner.schema import Plan
from planner.tokens import format_prompt
from safeio import InputError
from toyworld import vocab as V
from toyworld.eval.runner import read_folder
from toyworld.grammar import FAMILIES, HELDOUT_PHRASES
from toyworld.pretrained import pretrained_path


# ------------------------------------------------------------------------------------------ the loss
def _errs(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) for _ in range(4)]


def test_policy_equal_to_reference_gives_log2_and_opposite_gradients():
    _, _, rw, rl = _errs(0)
    pw, pl = rw.clone().requires_grad_(), rl.clone().requires_grad_()
    out = diffusion_dpo_loss(pw, pl, rw, rl, beta=2500.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(pw.grad, -pl.grad)
    torch.testing.assert_close(pw.grad, torch.full_like(pw, 2500.0 / 2 / len(pw)))  # sigma(0) * beta / B
    assert torch.all(out.implicit_acc == 0.5) and torch.all(out.reward_margin == 0)


def test_beta_scales_the_logit_as_the_equation_says():
    pw, pl, rw, rl = _errs(1)
    inner = (pw - rw) - (pl - rl)
    for beta in (1.0, 10.0, 2500.0):
        out = diffusion_dpo_loss(pw, pl, rw, rl, beta=beta)
        torch.testing.assert_close(out.reward_margin, -beta * inner)
        torch.testing.assert_close(out.loss, -torch.nn.functional.logsigmoid(-beta * inner).mean())
    # beta times the errors' differences is all that matters: (2 beta, errors / 2) == (beta, errors)
    a = diffusion_dpo_loss(pw, pl, rw, rl, beta=50.0).loss
    b = diffusion_dpo_loss(pw / 2, pl / 2, rw / 2, rl / 2, beta=100.0).loss
    torch.testing.assert_close(a, b)


def test_sft_term_adds_the_winners_diffusion_loss():
    pw, pl, rw, rl = _errs(2)
    base = diffusion_dpo_loss(pw, pl, rw, rl, beta=10.0).loss
    with_sft = diffusion_dpo_loss(pw, pl, rw, rl, beta=10.0, sft_weight=0.5).loss
    torch.testing.assert_close(with_sft, base + 0.5 * pw.mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_float32_under_half_precision_autocast(dtype):
    pw, pl, rw, rl = (x.to(dtype) for x in _errs(3))
    with torch.autocast("cpu", dtype=dtype):
        out = diffusion_dpo_loss(pw, pl, rw, rl, beta=5000.0)
    assert out.loss.dtype == torch.float32 and out.reward_margin.dtype == torch.float32
    assert torch.isfinite(out.loss)


def test_a_step_lowers_the_winners_error_relative_to_the_losers():
    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    reference.load_state_dict(policy.state_dict())
    xw, xl, noise = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)  # one noise draw for both

    def errors(model):
        return ((model(xw) - noise) ** 2).mean(1), ((model(xl) - noise) ** 2).mean(1)

    with torch.no_grad():
        rw, rl = errors(reference)
    before = (rw - rl).detach()
    opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
    pw, pl = errors(policy)
    diffusion_dpo_loss(pw, pl, rw, rl, beta=100.0).loss.backward()
    opt.step()
    with torch.no_grad():
        pw, pl = errors(policy)
    assert (pw - pl).mean() < before.mean()
    assert diffusion_dpo_loss(pw, pl, rw, rl, beta=100.0).implicit_acc.mean() > 0.5


def test_bad_arguments_are_named():
    pw, pl, rw, rl = _errs(4)
    with pytest.raises(ValueError, match="beta must be > 0"):
        diffusion_dpo_loss(pw, pl, rw, rl, beta=0.0)
    with pytest.raises(ValueError, match="four \\(B,\\) tensors"):
        diffusion_dpo_loss(pw, pl[:3], rw, rl, beta=1.0)


# ------------------------------------------------------------------------------------------ Pick-a-Pic pairs
def _png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _pickapic(path, rows):
    table = pa.table(
        {
            "caption": [r[0] for r in rows],
            "jpg_0": [r[1] for r in rows],
            "jpg_1": [r[2] for r in rows],
            "label_0": [r[3] for r in rows],
            "label_1": [None if r[3] is None else 1.0 - r[3] for r in rows],
            "are_different": [r[4] for r in rows],
        }
    )
    pq.write_table(table, path)
    return path


def test_split_pairs_keeps_a_captions_pairs_on_one_side():
    captions = [f"prompt {i // 3}" for i in range(60)]  # 20 captions, 3 pairs each
    train, held = split_pairs(captions, 0.25, seed=0)
    assert len(held) == 15 and sorted(np.concatenate([train, held]).tolist()) == list(range(60))
    assert not {captions[i] for i in train} & {captions[i] for i in held}
    assert len(split_pairs(["a", "a", "b", "b"], 0.25, seed=0)[1]) == 2  # one caption held out, not none
    unique = [f"prompt {i}" for i in range(40)]  # one pair per caption: a random split of the rows
    assert len(split_pairs(unique, 0.1, seed=0)[1]) == 4
    assert split_pairs(unique, 0.1, seed=0)[1].tolist() == sorted(np.random.default_rng(0).permutation(40)[:4])


def test_pickapic_pairs_load_with_ties_and_duplicates_dropped_and_counted(tmp_path):
    red, blue = _png("red"), _png("blue")
    path = _pickapic(tmp_path / "pairs.parquet", [
        ("a red thing", red, blue, 1.0, True),    # jpg_0 wins
        ("a blue thing", red, blue, 0.0, True),   # jpg_1 wins
        ("a tie", red, blue, 0.5, True),          # dropped: tie
        ("same images", red, red, 1.0, False),    # dropped: are_different False
        ("  ", red, blue, 1.0, True),             # dropped: empty caption
    ])  # fmt: skip
    pairs, report = alignment.load_preference_pairs(path, resolution=16, with_report=True)
    assert report == {"rows": 5, "ties": 1, "not_different": 1, "empty_caption": 1, "small_gap": 0, "kept": 2}
    assert pairs.column_names == ["caption", "group", "image_w", "image_l"] and pairs["group"] == pairs["caption"] == [
        "a red thing",
        "a blue thing",
    ]
    w0, l0 = np.asarray(pairs[0]["image_w"]), np.asarray(pairs[0]["image_l"])
    assert w0.shape == (16, 16, 3) and w0[..., 0].min() > 200 and l0[..., 2].min() > 200  # red won, blue lost
    assert np.asarray(pairs[1]["image_w"])[..., 2].min() > 200  # blue won
    # a saved `datasets` folder reads the same
    folder = tmp_path / "saved"
    alignment.load_preference_pairs(path, resolution=16).save_to_disk(str(folder))
    assert len(datasets.load_from_disk(str(folder))) == 2


def test_several_pair_sources_are_concatenated_with_their_reports_summed(tmp_path):
    red, blue = _png("red"), _png("blue")
    a = _pickapic(tmp_path / "a.parquet", [("first", red, blue, 1.0, True), ("tie", red, blue, 0.5, True)])
    b = _pickapic(tmp_path / "b.parquet", [("second", red, blue, 0.0, True)])
    pairs, report = alignment.load_preference_pairs([a, b], resolution=8, with_report=True)
    assert pairs["caption"] == ["first", "second"]
    assert report == {"rows": 3, "ties": 1, "not_different": 0, "empty_caption": 0, "small_gap": 0, "kept": 2}
    assert np.asarray(pairs[1]["image_w"])[..., 2].min() > 200  # the second file's winner (jpg_1, blue)
    with pytest.raises(DataPrepError, match="empty list"):
        alignment.load_preference_pairs([])
    with pytest.raises(DataPrepError, match="missing.parquet"):  # a bad source is named, not skipped
        alignment.load_preference_pairs([a, tmp_path / "missing.parquet"])


def test_reworded_pairs_copy_images_and_labels_and_keep_their_group_together(tmp_path):
    red, blue = _png("red"), _png("blue")
    raw = alignment.prepared.read_source(_pickapic(tmp_path / "a.parquet", [
        ("a red thing", red, blue, 1.0, True),
        ("a red thing", blue, red, 0.0, True),  # a second pair of the same candidate set
        ("a blue thing", red, blue, 0.0, True),
    ]))  # fmt: skip
    asked = []

    def reword(captions):
        asked.append(captions)
        return [["red, please", "show me a red thing"] if c == "a red thing" else [] for c in captions]

    out = alignment.preference.reword_pairs(raw, reword)
    assert asked == [["a red thing", "a blue thing"]]  # each distinct caption once
    assert out["caption"] == ["a red thing", "red, please", "show me a red thing"] * 2 + ["a blue thing"]
    assert out["group"] == ["a red thing"] * 6 + ["a blue thing"]
    assert out["jpg_0"][:3] == [red] * 3 and out["label_0"][3:6] == [0.0] * 3
    path = tmp_path / "reworded"
    out.save_to_disk(str(path))
    listing = sorted(f.name for f in path.iterdir())
    pairs = alignment.load_preference_pairs(path, resolution=8)
    assert sorted(f.name for f in path.iterdir()) == listing  # decoded pairs are cached elsewhere, not in the source
    again = alignment.load_preference_pairs(path, resolution=8, seed=1)  # other options: another cache file
    assert again["caption"] == pairs["caption"]
    assert pairs["group"] == out["group"] and np.asarray(pairs[4]["image_w"])[..., 0].min() > 200  # red won
    train, held = split_pairs(pairs["group"], 0.5, seed=0)  # a group's rows never straddle the split
    assert not {pairs["group"][i] for i in train} & {pairs["group"][i] for i in held}
    with pytest.raises(ValueError, match="1 lists for 2 captions"):
        alignment.preference.reword_pairs(raw, lambda captions: [[]])


def test_min_score_gap_keeps_only_decisive_ai_feedback_pairs(tmp_path):
    red, blue = _png("red"), _png("blue")
    path = _pickapic(tmp_path / "pairs.parquet", [("wide", red, blue, 1.0, True), ("narrow", red, blue, 0.0, True)])
    table = (
        pq.read_table(path)
        .append_column("score_0", pa.array([1.0, 0.8]))
        .append_column("score_1", pa.array([0.5, 0.9]))
    )
    pq.write_table(table, path)
    pairs, report = alignment.load_preference_pairs(path, resolution=8, min_score_gap=0.25, with_report=True)
    assert pairs["caption"] == ["wide"] and report["small_gap"] == 1 and report["kept"] == 1
    assert len(alignment.load_preference_pairs(path, resolution=8)) == 2  # no gap asked: scores unread
    with pytest.raises(DataPrepError, match="no column 'score_0'"):  # Pick-a-Pic has no labeller scores
        alignment.load_preference_pairs(_pickapic(tmp_path / "p.parquet", [("x", red, blue, 1.0, True)]),
                                        min_score_gap=0.1)  # fmt: skip
    nan = table.set_column(table.column_names.index("score_0"), "score_0", pa.array([1.0, float("nan")]))
    pq.write_table(nan, tmp_path / "nan.parquet")
    with pytest.raises(DataPrepError, match="row 1: score_0 is nan"):
        alignment.load_preference_pairs(tmp_path / "nan.parquet", min_score_gap=0.1)


def test_pickapic_bad_input_names_the_file_row_and_column(tmp_path):
    red = _png("red")
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [red], "label_0": [1.0]}), missing)
    with pytest.raises(DataPrepError, match="no column 'jpg_1'"):
        alignment.load_preference_pairs(missing)
    bad_label = _pickapic(tmp_path / "label.parquet", [("x", red, red, 2.0, True)])
    with pytest.raises(DataPrepError, match="row 0: label_0 is 2.0"):
        alignment.load_preference_pairs(bad_label)
    corrupt = _pickapic(tmp_path / "corrupt.parquet", [("x", red, b"not an image", 0.0, True)])
    with pytest.raises(DataPrepError, match="row 0, column 'jpg_1'.*unreadable image"):
        alignment.load_preference_pairs(corrupt, resolution=16)
    with pytest.raises(DataPrepError, match="does not exist"):
        alignment.load_preference_pairs(tmp_path / "nowhere.parquet")


# ------------------------------------------------------------------------------------------ U-Net LoRA DPO step
def _tiny_dpo_setup(b: int = 4):
    unet, scheduler = tiny_unet(), tiny_scheduler()
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(b, 5, 32, generator=g), torch.ones(b, 5, dtype=torch.bool))
    zw, zl = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    return unet, scheduler, cond, zw, zl


def test_dpo_timesteps_are_drawn_from_the_configured_range(monkeypatch):
    unet, scheduler, cond, zw, zl = _tiny_dpo_setup()
    seen = []
    real = alignment.dpo.policy_and_reference_errors

    def spy(unet, scheduler, cond, ref_cond, zw, zl, noise, t, reference=None):
        seen.append(t.clone())
        return real(unet, scheduler, cond, ref_cond, zw, zl, noise, t, reference)

    monkeypatch.setattr(alignment.dpo, "policy_and_reference_errors", spy)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        dpo_step_losses(unet, scheduler, cond, zw, zl, beta=1.0, generator=g, timesteps=(700, 1000))
    drawn = torch.cat(seen)
    assert drawn.min() >= 700 and drawn.max() < 1000
    n = scheduler.config.num_train_timesteps
    assert dpo_timesteps(DPOTrainConfig(), scheduler) is None  # the default: every timestep
    assert dpo_timesteps(DPOTrainConfig(min_timestep=500), scheduler) == (500, n)
    with pytest.raises(InputError, match="past the scheduler"):
        dpo_timesteps(DPOTrainConfig(max_timestep=n + 1), scheduler)
    with pytest.raises(InputError, match="min_timestep < max_timestep"):
        DPOTrainConfig(min_timestep=600, max_timestep=600)


def test_unet_lora_starts_as_the_reference_and_disabling_gives_the_base_unet():
    unet, scheduler, cond, zw, zl = _tiny_dpo_setup()
    noise, t = torch.randn_like(zw), torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        base_w, base_l = pair_errors(unet, scheduler, cond, zw, zl, noise, t)
    params = add_unet_lora(unet, rank=4)
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in unet.parameters()) == len(params)
    out = dpo_step_losses(unet, scheduler, cond, zw, zl, beta=1000.0, generator=torch.Generator().manual_seed(1))
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-5)  # B = 0: policy == reference
    with torch.no_grad():
        params[1].add_(0.5)  # move the policy away from the reference
        with adapters_disabled(unet):
            ref_w, ref_l = pair_errors(unet, scheduler, cond, zw, zl, noise, t)
        pol_w, _ = pair_errors(unet, scheduler, cond, zw, zl, noise, t)
    torch.testing.assert_close(ref_w, base_w)
    torch.testing.assert_close(ref_l, base_l)
    assert not torch.allclose(pol_w, base_w)
    assert all(p.requires_grad for p in params)  # switching the adapters off and on kept them trainable


def test_dpo_steps_on_the_unet_lora_raise_implicit_accuracy_on_their_pairs():
    unet, scheduler, cond, zw, zl = _tiny_dpo_setup()
    params = add_unet_lora(unet, rank=4)
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        out = dpo_step_losses(unet, scheduler, cond, zw, zl, beta=500.0, generator=g)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"].item())
    g_eval = torch.Generator().manual_seed(123)
    with torch.no_grad():
        acc = torch.stack([dpo_step_losses(unet, scheduler, cond, zw, zl, 500.0, g_eval)["implicit_acc"]
                           for _ in range(8)]).mean()  # fmt: skip
    assert losses[-1] < losses[0] and acc > 0.6


# ------------------------------------------------------------------------------------------ stage D
def _caption_cond(captions):
    rows = [torch.Generator().manual_seed(sum(map(ord, c))) for c in captions]
    return Conditioning(torch.stack([torch.randn(5, 32, generator=g) for g in rows]),
                        torch.ones(len(captions), 5, dtype=torch.bool))  # fmt: skip


def test_stage_d_trains_logs_heldout_metrics_and_exports_a_lora_that_loads(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buf_w, buf_l = io.BytesIO(), io.BytesIO()
        Image.fromarray(img).save(buf_w, format="PNG")
        Image.fromarray(255 - img).save(buf_l, format="PNG")
        rows.append((f"caption {i % 3}", buf_w.getvalue(), buf_l.getvalue(), float(i % 2), True))
    path = _pickapic(tmp_path / "pairs.parquet", rows)
    unet, vae, scheduler = tiny_unet(sample_size=8), tiny_vae(), tiny_scheduler()
    cfg = DPOTrainConfig(pairs=str(path), out=str(tmp_path / "dpo"), beta=500.0, lora_rank=2, lr=1e-3,
                         batch_size=4, max_steps=4, warmup=1, heldout_fraction=0.25, log_every=2)  # fmt: skip
    folder = train_unet_dpo(cfg, unet, vae, scheduler, _caption_cond, progress=False)
    log = [json.loads(x) for x in (tmp_path / "dpo" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    for key in ("loss", "implicit_acc", "reward_margin", "heldout_implicit_acc", "heldout_diffusion_loss",
                "heldout_ref_diffusion_loss"):  # fmt: skip
        assert all(np.isfinite(r[key]) for r in log), key
    fresh = tiny_unet(sample_size=8)
    load_unet_dpo(fresh, folder)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), _caption_cond(["a", "b"])
    with torch.no_grad():
        trained, loaded = unet_forward(unet.eval(), x, t, cond), unet_forward(fresh, x, t, cond)
        base = unet_forward(tiny_unet(sample_size=8), x, t, cond)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(loaded, base)
    with pytest.raises(ValueError, match="has no unet_dpo.safetensors"):
        load_unet_dpo(fresh, tmp_path)
    small = DPOTrainConfig(pairs=str(path), out=str(tmp_path / "dpo2"), batch_size=64)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_unet_dpo(small, tiny_unet(sample_size=8), vae, scheduler, _caption_cond, progress=False)


def _random_dpo_folder(folder, seed: int, rank: int = 2):
    """A DPO folder of a tiny U-Net's LoRA with random factors (B != 0), as `save_dpo` writes it."""
    torch.manual_seed(seed)
    unet = tiny_unet(sample_size=8)
    with torch.no_grad():
        for p in add_unet_lora(unet, rank=rank):
            p.normal_(std=0.1)
    return save_dpo(_Trained(unet), folder)


def test_a_soup_of_dpo_loras_merges_to_the_mean_of_the_merged_unets(tmp_path):
    folders = [_random_dpo_folder(tmp_path / f"d{i}", seed=i) for i in range(3)]
    merged = []
    for f in folders:
        unet = tiny_unet(sample_size=8)
        load_unet_dpo(unet, f)
        merged.append(dict(unet.named_parameters()))
    soup = soup_unet_dpo(folders, tmp_path / "soup")
    fresh = tiny_unet(sample_size=8)
    load_unet_dpo(fresh, soup)
    base, changed = dict(tiny_unet(sample_size=8).named_parameters()), 0
    for name, p in fresh.named_parameters():
        mean = torch.stack([m[name].detach() for m in merged]).mean(0)
        torch.testing.assert_close(p.detach(), mean, atol=1e-6, rtol=1e-5)
        changed += not torch.equal(p, base[name]) if "attn" in name else 0
    assert changed > 0  # the soup did move the adapted layers
    weighted = soup_unet_dpo(folders[:2], tmp_path / "w", weights=[1.0, 0.0])
    only_first = tiny_unet(sample_size=8)
    load_unet_dpo(only_first, weighted)
    for name, p in only_first.named_parameters():
        torch.testing.assert_close(p.detach(), merged[0][name].detach(), atol=1e-6, rtol=1e-5)
    assert json.loads((soup / "config.json").read_text())["kind"] == "dpo_soup"


def test_a_soup_refuses_one_folder_mismatched_layers_and_wrong_weights(tmp_path):
    a = _random_dpo_folder(tmp_path / "a", seed=0)
    with pytest.raises(InputError, match="at least two"):
        soup_unet_dpo([a], tmp_path / "s")
    with pytest.raises(InputError, match="2 weights for 3"):
        soup_unet_dpo([a, a, a], tmp_path / "s", weights=[0.5, 0.5])
    b = tmp_path / "b"
    b.mkdir()
    (b / "unet_dpo.safetensors").write_bytes((a / "unet_dpo.safetensors").read_bytes()[:100])
    with pytest.raises(InputError, match="unreadable"):
        soup_unet_dpo([a, b], tmp_path / "s")
    c = _random_dpo_folder(tmp_path / "c", seed=1)
    delta = load_file(str(c / "unet_dpo.safetensors"))
    save_file({k: v for i, (k, v) in enumerate(sorted(delta.items())) if i >= 2}, str(c / "unet_dpo.safetensors"))
    with pytest.raises(InputError, match="other U-Net layers"):
        soup_unet_dpo([a, c], tmp_path / "s")
    assert not (tmp_path / "s").exists()  # nothing half-written


# ------------------------------------------------------------------------------------------ planner DPO (TRL)
GOOD = ("<IMG_BEGIN> <STYLE> plain background <LAYOUT> 1 object, center <OBJECT> 1 medium red circle at center "
        "<COLOR> red <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>")  # fmt: skip
BAD = GOOD.replace("red circle", "blue square").replace("<COLOR> red", "<COLOR> blue")


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])
def test_planner_dpo_trains_a_lora_that_the_planner_loads_and_prefers_the_chosen_plan(tmp_path, sft_weight):
    planner_dir = save_tiny_planner(tmp_path / "llm", "qwen2")
    writer = PairWriter()
    for prompt in ("a red circle", "one red circle in the middle", "a circle, red", "red circle please"):
        writer.add_plans(prompt, GOOD, BAD)
    writer.save(tmp_path / "pairs")
    cfg = PlannerDPOConfig(pairs=str(tmp_path / "pairs" / "plans"), planner=str(planner_dir),
                           out=str(tmp_path / "dpo"), lora_rank=4, lr=5e-3, max_steps=6, batch_size=2, logging_steps=2,
                           precompute_ref_log_probs=True, sft_weight=sft_weight)  # fmt: skip
    adapter = train_planner_dpo(cfg, V.TOY_PLAN_SPEC)
    log = [json.loads(x) for x in (tmp_path / "dpo" / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log)
    margins = [r["rewards/margins"] for r in log if "rewards/margins" in r]
    assert margins and margins[-1] > 0  # the chosen plan's implicit reward rose above the rejected one's
    tuned = Planner.from_pretrained(planner_dir, spec=V.TOY_PLAN_SPEC, adapter=adapter)
    base = Planner.from_pretrained(planner_dir, spec=V.TOY_PLAN_SPEC)

    def logprob(p, plan):
        prompt = format_prompt(p.tokenizer, "a red circle")
        ids = p.tokenizer(prompt + " " + plan, return_tensors="pt").input_ids
        n = len(p.tokenizer(prompt).input_ids)
        with torch.no_grad():
            logits = p.model(ids).logits[0, n - 1 : -1]
        return logits.log_softmax(-1).gather(1, ids[0, n:, None]).sum()

    assert logprob(tuned, GOOD) - logprob(tuned, BAD) > logprob(base, GOOD) - logprob(base, BAD)
    if sft_weight:  # the SFT term on the chosen plans raises their likelihood, not only the margin
        assert logprob(tuned, GOOD) > logprob(base, GOOD)
    assert tuned.plan(["a red circle"])[0].plan is not None  # it still plans (constrained)
    merged = Planner.from_pretrained(tmp_path / "dpo" / "final" / "writer", spec=V.TOY_PLAN_SPEC)  # for --writer
    torch.testing.assert_close(logprob(merged, GOOD), logprob(tuned, GOOD), atol=1e-4, rtol=1e-4)


def test_self_play_pairs_put_the_datas_plan_against_every_differing_plan_of_the_planner(tmp_path):
    planner = Planner.from_pretrained(save_tiny_planner(tmp_path / "llm", "llama"), spec=V.TOY_PLAN_SPEC)
    rows = [("a red circle", GOOD), ("one blue square", BAD)]
    greedy = [r.plan.to_text() for r in planner.plan([p for p, _ in rows])]

    def same(want, got):
        return got is not None and want.to_text() == got.to_text()

    options = {"samples": 3, "temperature": 1.5, "seed": 0, "spec": V.TOY_PLAN_SPEC}
    writer, report = self_play_plan_pairs(planner, rows, same, **options)
    assert report["rows"] == 2 and report["pairs"] == len(writer.plan_rows) >= 1
    assert report["greedy_right"] == sum(g == Plan.parse(p).to_text() for g, (_, p) in zip(greedy, rows))
    for row in writer.plan_rows:  # chosen: the row's own plan; rejected: a different plan the planner wrote
        want = dict(rows)[row["prompt"]]
        assert row["chosen"] == Plan.parse(want).to_text() != row["rejected"]
        Plan.parse(row["rejected"], V.TOY_PLAN_SPEC)
    assert len({tuple(r.values()) for r in writer.plan_rows}) == len(writer.plan_rows)  # distinct pairs
    again, _ = self_play_plan_pairs(planner, rows, same, **options)
    assert again.plan_rows == writer.plan_rows  # seeded
    everything_same, report = self_play_plan_pairs(planner, rows, lambda w, g: True, samples=1)
    assert everything_same.plan_rows == [] and report["greedy_right"] == 2
    with pytest.raises(DataPrepError, match="no rows"):
        self_play_plan_pairs(planner, [], same)
    with pytest.raises(DataPrepError, match=r"row 1 \('x'\): its plan does not parse"):
        self_play_plan_pairs(planner, [rows[0], ("x", "<IMG_BEGIN> nonsense")], same)


def test_mine_plan_pairs_script_writes_trl_pairs_from_training_rows_and_a_report(tmp_path):
    script = Path(__file__).parent.parent / "scripts" / "mine_plan_pairs.py"
    out = tmp_path / "pairs"
    done = subprocess.run([sys.executable, str(script), "--rows", "24", "--seed", "3", "--samples", "1",
                           "--temperature", "2.0", "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 24 and report["config"]["seed"] == 3
    assert report["pairs"] > 0 and report["rows_with_pair"] <= report["pairs"]  # sampling hot: some plans differ
    writer = Planner.from_pretrained(pretrained_path("planner"), spec=V.TOY_PLAN_SPEC)
    rows = plan_pairs(out / "plans", writer.tokenizer, V.TOY_PLAN_SPEC)  # what train_planner_dpo reads
    assert len(rows) == report["pairs"]
    prompts = datasets.load_from_disk(str(out / "plans"))["prompt"]
    said = [(q, p) for q in prompts for p in HELDOUT_PHRASES if re.search(rf"\b{re.escape(p)}\b", q.lower())]
    assert said == []  # training wordings only: no held-out frame's phrase


def test_contrast_pairs_move_one_thing_and_keep_the_rejected_scene_coherent():
    side = "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 2 objects, side by side <OBJECT> 1 medium red circle at left"
    side += " <OBJECT> 1 small blue star at right <COLOR> red, blue <MATERIAL> solid <LIGHTING> dim light"
    side += " <CAMERA> medium shot <IMG_END>"
    twins = "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 2 objects, stacked <OBJECT> 2 medium red circle at top,"
    twins += " bottom <COLOR> red <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>"
    rows = [("a red circle left of a small blue star in dim light", side),
            ("two red circles, one over the other", twins), ("a red circle", GOOD)]  # fmt: skip
    writer, report = contrast_plan_pairs(rows, V.TOY_PLAN_SPEC)
    assert report == {"rows": 3, "rows_with_pair": 2, "mirror": 1, "rearrange": 2, "color": 1, "pairs": 4}
    got = {(r["prompt"], r["rejected"]) for r in writer.plan_rows}
    assert all(r["chosen"] == dict(rows)[r["prompt"]] for r in writer.plan_rows)  # the data's plan is chosen
    mirrored = side.replace("at left", "at RIGHT").replace("at right", "at left").replace("RIGHT", "right")
    stacked = side.replace("side by side", "stacked").replace("at left", "at top").replace("at right", "at bottom")
    recolored = side.replace("<COLOR> red, blue", "<COLOR> red, red")
    twins_side = twins.replace("stacked", "side by side").replace("top, bottom", "left, right")
    assert got == {(rows[0][0], mirrored), (rows[0][0], stacked), (rows[0][0], recolored), (rows[1][0], twins_side)}
    for _, rejected in got:  # every rejected plan is a plan of the toy world (its LAYOUT derived again)
        Plan.parse(rejected, V.TOY_PLAN_SPEC)
    only_mirror, report = contrast_plan_pairs(rows, V.TOY_PLAN_SPEC, kinds=["mirror"])
    assert report["pairs"] == 1 and only_mirror.plan_rows[0]["rejected"] == mirrored
    with pytest.raises(ValueError, match="contrast kinds"):
        contrast_plan_pairs(rows, V.TOY_PLAN_SPEC, kinds=["shuffle"])
    with pytest.raises(DataPrepError, match="row 1 .*does not parse"):
        contrast_plan_pairs([rows[0], ("x", "<IMG_BEGIN> nonsense")], V.TOY_PLAN_SPEC)


def test_one_object_contrasts_add_an_unasked_object_or_change_the_shape():
    rows = [("a red circle", GOOD)]
    kinds = ["extra", "copy", "shape"]
    writer, report = contrast_plan_pairs(rows, V.TOY_PLAN_SPEC, kinds=kinds)
    assert report == {"rows": 1, "rows_with_pair": 1, "extra": 1, "copy": 1, "shape": 1, "pairs": 3}
    chosen = Plan.parse(GOOD, V.TOY_PLAN_SPEC)
    extra, copy, shape = (Plan.parse(r["rejected"], V.TOY_PLAN_SPEC) for r in writer.plan_rows)
    grammar = V.TOY_PLAN_SPEC.object_grammar
    (obj,) = chosen.structured_objects(grammar)
    for rejected, same_shape in ((extra, False), (copy, True)):
        two = rejected.structured_objects(grammar)
        assert rejected.layout == "2 objects, side by side"
        assert sorted(p for o in two for p in o.positions) == ["left", "right"]
        assert sum(dataclasses.replace(o, positions=()) == dataclasses.replace(obj, positions=()) for o in two) == 1
        other = next(o for o in two if dataclasses.replace(o, positions=()) != dataclasses.replace(obj, positions=()))
        assert (other.name == obj.name) == same_shape and other.color != obj.color
        assert rejected.color == ", ".join(o.color for o in two)  # COLOR derived again
    (moved,) = shape.structured_objects(grammar)
    assert moved.name != obj.name and dataclasses.replace(moved, name=obj.name) == obj
    assert shape.to_text().replace(moved.name, obj.name) == GOOD  # nothing else changed
    again, _ = contrast_plan_pairs(rows, V.TOY_PLAN_SPEC, kinds=kinds)
    assert again.plan_rows == writer.plan_rows  # the draw is seeded by the plan: reproducible
    _, default = contrast_plan_pairs(rows, V.TOY_PLAN_SPEC)
    assert default["pairs"] == 0  # the default kinds are the two-slot ones, as the first contrast pairs


def test_mine_plan_pairs_contrast_source_needs_no_planner(tmp_path):
    script = Path(__file__).parent.parent / "scripts" / "mine_plan_pairs.py"
    out = tmp_path / "pairs"
    done = subprocess.run([sys.executable, str(script), "--source", "contrast", "--contrasts", "mirror",
                           "--rows", "40", "--seed", "3", "--planner", str(tmp_path / "absent"), "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] == report["mirror"] > 0 and "rearrange" not in report
    assert len(datasets.load_from_disk(str(out / "plans"))) == report["pairs"]


def test_planner_dpo_refuses_a_negative_sft_weight_before_loading_anything(tmp_path):
    with pytest.raises(InputError, match="sft_weight must be >= 0"):
        train_planner_dpo(PlannerDPOConfig(pairs=str(tmp_path / "none"), out=str(tmp_path / "o"), sft_weight=-1.0))
    assert not (tmp_path / "o").exists()


def test_plan_pairs_with_a_broken_plan_name_the_row(tmp_path):
    planner_dir = save_tiny_planner(tmp_path / "llm", "llama")
    tok = Planner.from_pretrained(planner_dir, spec=V.TOY_PLAN_SPEC).tokenizer
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": GOOD, "rejected": "<IMG_BEGIN> nonsense"}) + "\n")
    with pytest.raises(DataPrepError, match="row 0, column 'rejected'"):
        plan_pairs(bad, tok, V.TOY_PLAN_SPEC)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "x", "chosen": GOOD}) + "\n")
    with pytest.raises(DataPrepError, match=r"lack columns \['rejected'\]"):
        plan_pairs(missing, tok, V.TOY_PLAN_SPEC)


def test_several_plan_pair_files_are_read_one_after_another(tmp_path):
    planner_dir = save_tiny_planner(tmp_path / "llm", "llama")
    tok = Planner.from_pretrained(planner_dir, spec=V.TOY_PLAN_SPEC).tokenizer
    files = []
    for name, n in (("a", 2), ("b", 3)):
        files.append(tmp_path / f"{name}.jsonl")
        rows = [{"prompt": f"{name} {i}", "chosen": GOOD, "rejected": GOOD.replace("red", "blue")} for i in range(n)]
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    both = all_plan_pairs(f"{files[0]},{files[1]}", tok, V.TOY_PLAN_SPEC)
    assert len(both) == 5 and both["prompt"][0] == plan_pairs(files[0], tok, V.TOY_PLAN_SPEC)["prompt"][0]
    assert both["prompt"][4] == plan_pairs(files[1], tok, V.TOY_PLAN_SPEC)["prompt"][2]
    with pytest.raises(DataPrepError, match="missing"):
        all_plan_pairs(f"{files[0]},{tmp_path / 'missing'}", tok, V.TOY_PLAN_SPEC)
    with pytest.raises(DataPrepError, match="no plan-pair path"):
        all_plan_pairs(" , ", tok, V.TOY_PLAN_SPEC)


def test_plot_dpo_draws_the_diagnostics_of_unet_and_planner_runs(tmp_path):
    pytest.importorskip("matplotlib")
    unet = [{"step": s, "loss": 0.69 - 0.01 * s, "implicit_acc": 0.5 + 0.05 * s, "reward_margin": 0.1 * s,
             "heldout_implicit_acc": 0.55, "heldout_reward_margin": 0.05, "heldout_diffusion_loss": 0.03,
             "heldout_ref_diffusion_loss": 0.03, "grad_norm": 1.0} for s in (1, 2, 3)]  # fmt: skip
    planner = [{"step": s, "loss": 0.6, "rewards/accuracies": 0.7, "rewards/margins": 0.2} for s in (2, 4)]
    for name, rows in (("unet", unet), ("planner", planner)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).parent.parent / "scripts" / "plot_dpo.py"
    out = tmp_path / "plot.png"
    subprocess.run([sys.executable, str(script), str(tmp_path / "unet"), str(tmp_path / "planner"), "--out", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    assert Image.open(out).size[0] > 400


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_dpo_with_8bit_adamw_on_a_machine_without_cuda_says_so():
    cfg = DPOTrainConfig(optimizer="adamw8bit")
    with pytest.raises(ValueError, match="adamw8bit.*needs a CUDA GPU"):
        make_optimizer(cfg.optimizer, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": cfg.lr}])


def test_connector_dpo_reference_uses_the_frozen_time_modulation_inside_the_unet():
    """The connector's pooled stream acts through the U-Net's class embedding: the reference pass must see the
    frozen copy's time modulation, not the one being trained (else the reference drifts with the policy)."""
    torch.manual_seed(0)
    unet = tiny_unet(sample_size=8)
    cfg = ConnectorConfig(d_llm=16, d_ctx=32, d_time=time_embedding_dim(unet), kind="mlp", width=16, d_pooled=8)
    bridge = LLMBridge(cfg, torch.zeros(1, 4, 32), None)
    bridge.attach(unet)
    source = ConnectorConditioning(bridge, states=None, native=None, masks=None)
    live = unet.class_embedding
    assert live is bridge.connector.time_modulation
    with torch.no_grad():
        for q in live.parameters():
            q.add_(1.0)  # a training step moved the policy's time modulation
    with source.as_reference(unet):
        assert unet.class_embedding is source.reference.connector.time_modulation
        assert not torch.equal(next(unet.class_embedding.parameters()), next(live.parameters()))
    assert unet.class_embedding is live
    with FixedConditioning(None).as_reference(unet):
        assert unet.class_embedding is live


def test_error_split_counts_images_by_whether_the_writer_plans_their_prompt_right(tmp_path):
    red = "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 1 object, center <OBJECT> 1 medium red circle at center "
    red += "<COLOR> red <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>"
    meta = tmp_path / "metadata.jsonl"  # the writer plans "a red circle" right; "a blue square" is not a red circle
    entry = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "plan": red}
    meta.write_text("".join(json.dumps(entry | {"prompt": q}) + "\n" for q in ("a red circle", "a blue square")))
    run = tmp_path / "run"
    run.mkdir()
    rows = [("a red circle", True), ("a red circle", False), ("a blue square", True), ("a blue square", False),
            ("a blue square", False)]  # fmt: skip
    (run / "results.jsonl").write_text("".join(json.dumps({"prompt": q, "correct": c}) + "\n" for q, c in rows))
    script = Path(__file__).parent.parent / "scripts" / "error_split.py"
    out = tmp_path / "split.json"
    done = subprocess.run([sys.executable, str(script), f"x={run}", "--metadata", str(meta), "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = json.loads(out.read_text())
    assert got["writer_right_prompts"] == 1 and got["prompts"] == 2
    row = got["rows"]["x"]
    assert (row["plan_right_correct"], row["plan_right_images"]) == (1, 2)
    assert (row["plan_wrong_correct"], row["plan_wrong_images"]) == (1, 3)
    assert row["accuracy"] == pytest.approx(2 / 5) and row["image_side_ceiling"] == pytest.approx(3 / 5)


def test_error_split_checks_the_plans_of_the_writer_it_is_given(tmp_path):
    red = "<IMG_BEGIN> <STYLE> plain background <LAYOUT> 1 object, center <OBJECT> 1 medium red circle at center "
    red += "<COLOR> red <MATERIAL> solid <LIGHTING> normal light <CAMERA> medium shot <IMG_END>"
    writer_right = load_script("error_split").writer_right
    assert writer_right(["a red circle"], [red]) == [True]  # the shipped writer
    untrained = save_tiny_planner(tmp_path / "llm", "llama")  # random weights: it does not write this plan
    assert writer_right(["a red circle"], [red], str(untrained)) == [False]


def test_critic_agreement_counts_detector_values_against_critic_readings():
    module = load_script("critic_agreement")
    plan = "<IMG_BEGIN> <STYLE> {style} background <LAYOUT> 1 object, center <OBJECT> 1 medium red circle at center "
    plan += "<COLOR> red <MATERIAL> solid <LIGHTING> {light} light <CAMERA> medium shot <IMG_END>"
    readings = [Plan.parse(plan.format(style=s, light=li), V.TOY_PLAN_SPEC)
                for s, li in (("plain", "bright"), ("vertical gradient", "normal"))] + [None]  # fmt: skip
    scenes = [{"style": "plain", "lighting": "bright"}, {"style": "horizontal gradient", "lighting": "bright"},
              {"style": "plain", "lighting": "dim"}]  # fmt: skip
    got = module.confusions([{"scene": s} for s in scenes], readings)
    assert got["STYLE"] == {("plain", "plain"): 1, ("horizontal gradient", "vertical gradient"): 1, ("plain", None): 1}
    assert got["LIGHTING"] == {("bright", "bright"): 1, ("bright", "normal"): 1, ("dim", None): 1}


def test_image_shift_measures_pixel_change_and_verdict_flips(tmp_path):
    module = load_script("dpo_winrate")
    runs = {}
    for name, shade, verdicts in (("before", 100, [True, False]), ("after", 110, [True, True])):
        run = runs[name] = tmp_path / name
        for sample in range(len(verdicts)):
            folder = run / "images" / "00000" / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (shade, shade, shade)).save(folder / f"{sample:04d}.png")
        rows = [{"prompt_index": 0, "sample": k, "correct": c} for k, c in enumerate(verdicts)]
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    was, now = (module.detector_scores(runs[k]) for k in ("before", "after"))
    (_, before), (_, after) = (read_folder(runs[k] / "images", 1) for k in ("before", "after"))
    got = module.image_shift(was, now, before, after)
    assert got == {"mean_abs_pixel_change": 10.0, "p90_abs_pixel_change": 10.0, "verdict_flips": 1, "images": 2}


def test_reword_pairs_keeps_only_wordings_the_writer_plans_the_same():
    writer = Planner.from_pretrained(pretrained_path("planner"), adapter=pretrained_path("planner_wide"),
                                     spec=V.TOY_PLAN_SPEC)  # fmt: skip
    captions = ["a circle on a horizontal gradient background", "a star in dim light"]
    alts = load_script("reword_pairs").writer_rewordings(writer, captions, per_caption=3, tries=8, seed=0)
    assert len(alts) == 2 and all(1 <= len(a) <= 3 for a in alts)
    for caption, words in zip(captions, alts):
        assert caption not in words and len(set(words)) == len(words)
        want = writer.plan([caption])[0].plan.to_text()
        assert [r.plan.to_text() for r in writer.plan(words)] == [want] * len(words)
    held_out_frames = {f.frame.split("{")[0] for f in FAMILIES if f.split == "heldout" and f.frame.split("{")[0]}
    assert not any(w.startswith(tuple(held_out_frames)) for ws in alts for w in ws)  # training wordings only


def test_eval_refine_stacks_the_reviser_over_the_writer_it_was_trained_on(tmp_path):
    stack = reviser_stack  # scripts/eval_refine.py and the CLI's --reviser both stack through it
    adapter, folder = tmp_path / "writer_adapter", tmp_path / "writer_folder"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    folder.mkdir()
    # an adapter writer sits under the reviser over the shipped planner (it was left out before)
    assert stack(adapter, "rev", "planner") == ("planner", [str(adapter), "rev"])
    assert stack(folder, "rev", "planner") == (str(folder), ["rev"])
    assert stack(None, "rev", "planner") == ("planner", ["rev"])
