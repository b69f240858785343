"""AION-Train: distributed training for Mixture-of-Experts multimodal transformers."""

__version__ = "0.1.0"
