"""Distill diffusion and flow-matching teachers into 1-4 step LoRA students."""
