"""Caches that outgrow RAM: sharded safetensors read memory-mapped, with shards smaller than the data set."""

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_planner, save_tiny_toy_base
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.bridge_data import hidden_state_cache, load_bridge_data
from alignment.shards import ShardedTable, ShardWriter, is_finished
from diffusion_backbone.models import load_backbone
from llm_bridge.encoder import PlanEncoder, PlanStates
from toyworld.data import build_dataset, load_dataset_dir


def test_rows_come_back_exactly_in_any_order_across_shards(tmp_path):
    g = torch.Generator().manual_seed(0)
    full = {
        "f16": torch.randn(12, 3, 2, generator=g).half(),
        "f32": torch.randn(12, 4, generator=g),
        "bf16": torch.randn(12, 2, generator=g).bfloat16(),
        "flag": torch.rand(12, 5, generator=g) > 0.5,
        "ids": torch.randint(0, 99, (12, 5), generator=g),
    }
    writer = ShardWriter(tmp_path / "t")
    (tmp_path / "t").mkdir()
    for start, stop in [(0, 5), (5, 10), (10, 12)]:
        writer.add({k: v[start:stop] for k, v in full.items()})
    assert not is_finished(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="not a finished sharded cache"):
        ShardedTable(tmp_path / "t")
    table = ShardedTable(writer.finish())
    assert len(table) == 12 and table.shard_rows == [5, 5, 2]
    idx = torch.tensor([11, 0, 5, 4, 9, 10, 0])
    for name, value in full.items():
        got = table[name][idx]
        assert got.dtype == value.dtype and torch.equal(got, value[idx]), name
    assert table["f32"].shape == (12, 4) and table["f32"].head(3).shape == (3, 4)
    assert isinstance(table._shard(0)["f32"][0], np.memmap)  # mapped, not read into memory
    with pytest.raises(IndexError):
        table["f32"].head(3)[torch.tensor([3])]
    with pytest.raises(ValueError, match="same tensors|tensors"):
        writer.add({"f32": full["f32"][:2]})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_dataset(root / "data", n=30, seed=4, workers=1, heldout_fraction=0.0, progress=False)
    prompts = list(load_dataset_dir(root / "data")["prompt"])
    return {"data": root / "data", "base": save_tiny_toy_base(root / "base", prompts), "llm": save_tiny_planner(root)}


def test_bridge_caches_in_small_shards_equal_one_shard(world, tmp_path):
    backbone = load_backbone(world["base"])
    small = load_bridge_data(world["data"], backbone, progress=False, shard_rows=8)
    folder = next((world["data"] / "cache").glob("bridge-base-*"))
    assert ShardedTable(folder).shard_rows == [8, 8, 8, 6]
    idx = torch.tensor([29, 3, 17, 8])
    small = [small.latents[idx], small.native_tokens[idx], small.native_mask[idx]]
    for f in folder.iterdir():  # rebuild as one shard and compare
        f.unlink()
    folder.rmdir()
    one = load_bridge_data(world["data"], backbone, progress=False, shard_rows=1000)
    assert ShardedTable(folder).shard_rows == [30]
    assert torch.allclose(small[0], one.latents[idx], atol=1e-5)  # the VAE in batches of 8 vs 30: float rounding
    assert torch.equal(small[1], one.native_tokens[idx]) and torch.equal(small[2], one.native_mask[idx])
    model = AutoModelForCausalLM.from_pretrained(world["llm"], local_files_only=True)
    encoder = PlanEncoder(model, AutoTokenizer.from_pretrained(world["llm"], local_files_only=True), "mean")
    cached = hidden_state_cache(encoder, one, world["llm"], True, tmp_path, batch_size=7, progress=False)
    assert len(list((tmp_path).glob("hidden-*/shard-*.safetensors"))) == 5  # 30 rows, 7 per shard
    parts = [encoder.encode(one.prompts[s : s + 7], one.plans[s : s + 7]) for s in range(0, 30, 7)]
    parts = [PlanStates(p.states.half(), p.mask, p.field_ids, p.object_ids) for p in parts]
    expected = PlanStates.cat(parts).index(idx)
    got = cached.index(idx)
    assert torch.equal(got.states, expected.states) and torch.equal(got.mask, expected.mask)
    assert torch.equal(got.field_ids, expected.field_ids) and torch.equal(got.object_ids, expected.object_ids)
