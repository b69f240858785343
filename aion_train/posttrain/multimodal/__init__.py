"""Multimodal post-training: SFT, the reward model and PPO where the prompt holds the image,
the sound or the clip (task.py), on the multimodal model's encoders and fused trunk
(models.py), with KV-cached media rollouts (rollout.py)."""
