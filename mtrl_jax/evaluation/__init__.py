"""Evaluation apart from the reward, and diagnostics of training runs."""
