#!/usr/bin/env python
"""Entry point: `deepspeed train.py configs/neox/baseconv_360m.yml` (see README). Wires the
after-checkpoint evaluations of eval/ (the AR slice, the eval_tasks lm-eval tasks) into the library's trainer."""
import sys

from eval.hook import ArSliceHook
from eval.lm_tasks import LmTasksHook
from neox_zoology.training.cli import main

if __name__ == "__main__":
    sys.exit(main(after_save=(ArSliceHook, LmTasksHook)))
