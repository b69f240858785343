"""Crash-safe, pickle-free checkpoints: the format, the store, the save protocol, resharding.

Modules, bottom up:

* ``errors``          CheckpointError, TreeFormatError
* ``tree_format``     the tree format (a ``.json`` structure + a ``.safetensors`` tensor file):
  supported values, dtype tables, ``tree_paths``
* ``tree_save`` / ``tree_load``   ``save_tree`` / ``load_tree``
* ``rank_files``      per-rank payloads in a checkpoint folder: ``save_rank``, ``load_rank``, ...
* ``rng_state``       ``capture_rng_state`` / ``restore_rng_state``
* ``compat``          ``check_compatible``: saved vs current config, every difference named
* ``store``           ``CheckpointManager``: temp folder, manifest (sha256), atomic rename,
  the ``latest`` pointer, pruning
* ``protocol``        ``save_checkpoint``: prepare -> barrier -> write -> barrier -> commit,
  the one save sequence of every job
* ``locate``          ``find_checkpoint`` / ``read_manifest`` from a path a user gives
* ``shard_layout``    ``shard_spec_for`` / ``saver_rank``: which rank holds which slice
* ``reshard``         the full state dict from any TP/EP layout and back
  (``load_full_state_dict``, ``shard_state_dict``, ``save_sharded_checkpoint``)
* ``optimizer_state`` a DeepSpeed engine's optimizer state <-> trees
* ``training_job``    ``save_job`` / ``load_job`` / ``load_weights_only`` of pretraining

Imports only go down: config, model, parallel, fsutil (never train, posttrain, interop...)."""

from __future__ import annotations

from .compat import check_compatible, flatten_config, latest_compatible
from .errors import CheckpointError, TreeFormatError
from .locate import find_checkpoint, read_manifest
from .optimizer_state import load_optimizer_state, optimizer_state
from .protocol import save_checkpoint
from .rank_files import list_ranks, load_rank, rank_file_names, rank_prefix, save_rank
from .reshard import (
    load_full_state_dict,
    model_config_from_dict,
    model_config_to_dict,
    numel,
    save_sharded_checkpoint,
    shard_state_dict,
)
from .rng_state import capture_rng_state, restore_rng_state
from .shard_layout import saver_rank, shard_spec_for
from .store import CheckpointManager
from .tree_format import tree_paths
from .tree_load import load_tree
from .tree_save import save_tree

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "TreeFormatError",
    "capture_rng_state",
    "check_compatible",
    "latest_compatible",
    "find_checkpoint",
    "flatten_config",
    "list_ranks",
    "load_full_state_dict",
    "load_optimizer_state",
    "load_rank",
    "load_tree",
    "model_config_from_dict",
    "model_config_to_dict",
    "numel",
    "optimizer_state",
    "rank_file_names",
    "rank_prefix",
    "read_manifest",
    "restore_rng_state",
    "save_checkpoint",
    "save_rank",
    "save_sharded_checkpoint",
    "save_tree",
    "saver_rank",
    "shard_spec_for",
    "shard_state_dict",
    "tree_paths",
]
