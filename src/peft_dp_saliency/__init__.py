"""peft-dp-saliency: differentially private saliency-aware LoRA fine-tuning of diffusion models."""

__version__ = "0.1.0"
