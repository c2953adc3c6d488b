"""Training: the LoRA train step (more lands with the trainer, issue 5)."""
