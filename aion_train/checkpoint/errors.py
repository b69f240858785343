"""The errors of the checkpoint package."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, incomplete or incompatible."""


class TreeFormatError(CheckpointError, ValueError):
    """A ``.json``/``.safetensors`` pair does not follow the tree format."""
