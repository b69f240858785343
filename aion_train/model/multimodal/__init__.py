"""Multimodal fusion model: encoders, resampler, gated fusion into the MoE trunk, joint losses."""

from .model import MultimodalModel, MultimodalOutput, build_multimodal_model

__all__ = ["MultimodalModel", "MultimodalOutput", "build_multimodal_model"]
