"""OpenSloth: SFT then GRPO with LoRA, on one GPU or many, from one command per stage."""

__version__ = "0.1.0"
