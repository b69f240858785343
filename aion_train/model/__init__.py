from .generate import generate
from .kv_cache import KVCache
from .transformer import ModelOutput, Transformer, build_model, cross_entropy_loss

__all__ = ["KVCache", "ModelOutput", "Transformer", "build_model", "cross_entropy_loss", "generate"]
