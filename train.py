#!/usr/bin/env python
"""Entry point: `deepspeed train.py configs/neox/baseconv_360m.yml` (see README)."""
import sys

from neox_zoology.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
