#!/usr/bin/env python
"""Thin entry point over `aion-train pretrain` for cluster launchers:

torchrun --nproc_per_node 8 launch/pretrain.py --config configs/F.yaml [overrides]
deepspeed --num_gpus 8 launch/pretrain.py --config configs/F.yaml [overrides]
"""

import sys

from aion_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain"] + sys.argv[1:]))
