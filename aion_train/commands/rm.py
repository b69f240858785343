"""aion-train rm [--config F] [overrides] [--nproc N] [--json]

Train the reward model on preference pairs of the chat task (needs a finished `sft` phase in
the same run_dir when rm.init=sft, the default). With --json one JSON line holding
`rm_pair_accuracy` (held-out pairs)."""

from __future__ import annotations

from .sft import add_phase_arguments, run_phase

add_arguments = add_phase_arguments


def run(args) -> int:
    return run_phase(args, "rm", "aion_train.posttrain.phases:run_rm", "rm_pair_accuracy")
