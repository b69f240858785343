"""Moving weights in and out of our checkpoint layout: Hugging Face Mixtral export/import,
PEFT LoRA adapters (resharding between TP/EP layouts is :mod:`aion_train.checkpoint.reshard`).
Nothing here needs torch.distributed."""
