"""Held-out evaluations of trained checkpoints (`aion-train eval --task ...`)."""
