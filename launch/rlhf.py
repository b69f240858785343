#!/usr/bin/env python
"""Thin entry point over `aion-train ppo --run-missing-phases` for cluster launchers: SFT and
the reward model when their done.json is missing in run_dir, then PPO.

    deepspeed --num_gpus 2 launch/rlhf.py --config configs/rlhf_tiny.yaml [overrides]
    torchrun --nproc_per_node 2 launch/rlhf.py --config configs/rlhf_tiny.yaml [overrides]
"""

import sys

from aion_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppo", "--run-missing-phases"] + sys.argv[1:]))
