from .errors import ConfigError
from .load import config_from_dict, config_to_dict, dump_yaml, flatten, load_config
from .schema import Config, DataConfig, ModelConfig, MoEConfig, ParallelConfig, TrackingConfig, TrainConfig
from .validate import data_parallel_size, has_moe, validate_config

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "data_parallel_size",
    "dump_yaml",
    "flatten",
    "has_moe",
    "load_config",
    "validate_config",
]
