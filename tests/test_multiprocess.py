"""Scale-out: two CPU processes (accelerate over torch.distributed, gloo) train the bridge to the same
parameters as one process with the same global batch."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_planner, save_tiny_toy_base, tiny_bridge_config

from toyworld.data import build_dataset, load_dataset_dir

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    build_dataset(tmp_path / "data", n=24, seed=6, workers=1, heldout_fraction=0.0, progress=False)
    prompts = list(load_dataset_dir(tmp_path / "data")["prompt"])
    base, llm = save_tiny_toy_base(tmp_path / "base", prompts), save_tiny_planner(tmp_path / "llm")
    stage = {"train": ["connector"], "steps": 3, "batch_size": 4, "cfg_dropout": 0.5, "clip_align_weight": 0.1,
             "clip_align_loss": "l2", "warmup": 1}  # fmt: skip
    runs = {}
    for name in ("one", "two"):
        cfg = tiny_bridge_config(tmp_path / "data", base, llm, tmp_path / name, {"A": stage})
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        runs[name] = tmp_path / name
    script = str(HERE / "multiprocess_bridge.py")
    launch = ["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    # the gradient of one global batch of 4: one process, and two processes of 2 rows each (DDP averages)
    _run([sys.executable, script, "grads", str(tmp_path / "one.json"), str(tmp_path / "g1.safetensors")], tmp_path)
    _run([*launch, script, "grads", str(tmp_path / "two.json"), str(tmp_path / "g2.safetensors")], tmp_path)
    g1, g2 = load_file(str(tmp_path / "g1.safetensors")), load_file(str(tmp_path / "g2.safetensors"))
    assert g1.keys() == g2.keys() and any(g.abs().sum() > 0 for g in g1.values())
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=1e-4, msg=k)
    # the whole curriculum under torchrun: one log and one checkpoint, written by the main process, and the same
    # losses while the weights are still equal (AdamW's first steps move near-zero gradients by +-lr whatever
    # their rounding, so later parameters agree only to about lr)
    _run([sys.executable, script, "train", str(tmp_path / "one.json")], tmp_path)
    launch[-1] = str(_free_port())
    _run([*launch, script, "train", str(tmp_path / "two.json")], tmp_path)
    logs = [[json.loads(x)["total"] for x in (runs[n] / "log.jsonl").read_text().splitlines()] for n in runs]
    assert len(logs[0]) == len(logs[1]) == 3
    # the LR schedule moves once per optimizer step, not once per process (as accelerate's prepared scheduler does)
    lrs = [[json.loads(x)["lr"] for x in (runs[n] / "log.jsonl").read_text().splitlines()] for n in runs]
    assert lrs[0] == lrs[1]
    torch.testing.assert_close(torch.tensor(logs[1][:2]), torch.tensor(logs[0][:2]), atol=1e-5, rtol=1e-5)
    one = load_file(str(runs["one"] / "checkpoint" / "trainable.safetensors"))
    two = load_file(str(runs["two"] / "checkpoint" / "trainable.safetensors"))
    assert one.keys() == two.keys()
    assert (runs["two"] / "stage-A" / "config.json").is_file()
