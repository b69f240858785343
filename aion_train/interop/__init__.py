"""Moving weights in and out of our checkpoint layout: resharding between TP/EP layouts,
Hugging Face Mixtral export/import, PEFT LoRA adapters. Nothing here needs torch.distributed."""
from .reshard import (find_checkpoint, load_full_state_dict, model_config_from_dict, save_sharded_checkpoint,
                      shard_spec_for, shard_state_dict)

__all__ = ["find_checkpoint", "load_full_state_dict", "model_config_from_dict", "save_sharded_checkpoint",
           "shard_spec_for", "shard_state_dict"]
