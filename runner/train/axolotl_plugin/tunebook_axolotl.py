"""An axolotl plugin that makes `axolotl train` train and log the way tunebook's hf backend does. It runs inside
the axolotl environment (runner/train/axolotl.py puts this folder on its PYTHONPATH and names the plugin in the
stage's config) and imports nothing from tunebook.

- on a machine without a GPU the trainer runs with `use_cpu`, so `bf16: true` (bf16 weights + bf16 autocast, as
  on the hf backend) is allowed: transformers refuses bf16 on a CPU without it, and axolotl never sets it;
- the first step's training loss is logged (hf: logging_first_step), so a short stage has a loss row;
- a NaN or infinite loss is logged as it is, not replaced by the mean of earlier ones (logging_nan_inf_filter);
- the first NaN or infinite loss / eval_loss (the evaluation before training included) is printed as one
  `tunebook-axolotl: non-finite {...}` line and stops training: tunebook fails the stage with it;
- at the end of training the trainer's state (every logged row) is written to output_dir/trainer_state.json,
  whether or not the last step was a checkpoint.
"""
from __future__ import annotations

import json
import math
import os

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

PREFIX = "tunebook-axolotl:"
WATCHED = ("loss", "eval_loss")


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class Watch(TrainerCallback):
    def __init__(self):
        self.seen = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in WATCHED:
            value = _number((logs or {}).get(key))
            if value is not None and not math.isfinite(value) and not self.seen:
                self.seen = True
                print(f"\n{PREFIX} non-finite " + json.dumps({"step": state.global_step, "metric": key,
                                                             "value": str(value)}), flush=True)
                control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))


class TunebookPlugin(BasePlugin):
    def get_training_args(self, cfg):
        import torch

        args = {"logging_first_step": True, "logging_nan_inf_filter": False}
        if not torch.cuda.is_available():
            args["use_cpu"] = True
        print(f"{PREFIX} plugin active: " + json.dumps(args), flush=True)
        return args

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [Watch()]
