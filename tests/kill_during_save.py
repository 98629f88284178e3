"""Launched by tests/test_bridge.py's kill-during-save test: ``CONFIG MARKER STEP`` trains the curriculum, and when
the checkpoint of optimizer step STEP is half written (its trainable weights on disk, nothing else), touches MARKER
and waits to be killed."""

import json
import sys
import time
from pathlib import Path

import torch

import alignment.bridge_training as training
from alignment.stages import config_from_dict

if __name__ == "__main__":
    torch.set_num_threads(1)
    config, marker, stop_step = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    real_write, real_save = training.BridgeTrainer._write_checkpoint, training.save_file

    def write(self, stage_index, step, *args):
        if step != stop_step:
            return real_write(self, stage_index, step, *args)

        def save_then_hang(tensors, path, *a, **k):
            real_save(tensors, path, *a, **k)
            marker.write_text(path)  # the first file of the new checkpoint is down: kill me now
            time.sleep(600)

        training.save_file = save_then_hang
        return real_write(self, stage_index, step, *args)

    training.BridgeTrainer._write_checkpoint = write
    training.BridgeTrainer(config_from_dict(json.loads(Path(config).read_text())), progress=False).run()
