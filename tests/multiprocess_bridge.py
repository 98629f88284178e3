"""Launched plainly and under torchrun by tests/test_multiprocess.py: ``train CONFIG`` runs the curriculum;
``grads CONFIG OUT`` computes the gradient of the first global batch (through the prepared, DDP-wrapped module)
and the main process saves it to OUT."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from alignment.bridge_training import BridgeTrainer, stage_generator
from alignment.loop import EpochSampler
from alignment.stages import config_from_dict


def first_batch_grads(trainer: BridgeTrainer, out: str) -> None:
    stage = trainer.cfg.stage_list()[0]
    opt, _, _, _ = trainer._fresh_state(0)
    module, opt = trainer.accelerator.prepare(trainer.module, opt)
    module.train()
    batch = EpochSampler(len(trainer.data), stage.batch_size, trainer.cfg.seed).batch(0)
    kwargs = trainer.make_batch(stage, batch, stage_generator(trainer.cfg.seed, 0), trainer.hidden_states(stage))
    trainer.accelerator.backward(module(**kwargs)["total"])
    if trainer.accelerator.is_main_process:
        grads = {n: p.grad.contiguous() for n, p in trainer.module.named_parameters() if p.grad is not None}
        save_file(grads, out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, config = sys.argv[1], config_from_dict(json.loads(Path(sys.argv[2]).read_text()))
    trainer = BridgeTrainer(config, progress=False)
    if mode == "train":
        trainer.run()
    else:
        first_batch_grads(trainer, sys.argv[3])
