"""aion-train check-config --config F [key=value ...]"""

from __future__ import annotations

import sys

from aion_train.config import ConfigError, dump_yaml, load_config


def add_config_arguments(p):
    """The --config/overrides pair that every config-driven command takes."""
    p.add_argument("--config", default=None, help="YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4")


def add_arguments(p):
    add_config_arguments(p)
    p.add_argument("--world-size", type=int, default=None, help="check against this many ranks")


def run(args) -> int:
    from aion_train.posttrain.user_data import check_phase_files, checkable_now, named_phases

    try:
        cfg = load_config(args.config, args.overrides, world_size=args.world_size)
        from aion_train.config import validate_config
        from aion_train.interop.hf_init import apply_hf_init

        if cfg.train.init_from or cfg.sft.init_from:  # the architecture an HF folder gives
            validate_config(apply_hf_init(cfg, "posttrain" if cfg.sft.init_from else "pretrain"))
        check_phase_files(
            cfg, checkable_now(cfg, named_phases(cfg))
        )  # the post-training files it names, record by record
    except (ConfigError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    print(dump_yaml(cfg), end="")
    return 0
