"""peft-dp-saliency: differentially private saliency-aware LoRA fine-tuning of diffusion models."""

from .accounting import PrivacyReport, calibrate_noise_multiplier, compute_epsilon
from .config import SaliencyLoraConfig
from .data import load_sensitive_dataset
from .loda import add_loda_adapters, load_adapter
from .selection import SelectionResult, select_target_modules
from .train import TrainingResult, fit
from .training_config import TrainingConfig

__version__ = "0.1.0"
__all__ = ["PrivacyReport", "SaliencyLoraConfig", "SelectionResult", "TrainingConfig", "TrainingResult",
           "add_loda_adapters", "calibrate_noise_multiplier", "compute_epsilon", "fit", "load_adapter",
           "load_sensitive_dataset", "select_target_modules"]
