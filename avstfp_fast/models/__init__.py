"""AV-STFP models: configuration, the frozen tower helpers, PromptedCLIP."""
from .config import AVSTFPConfig
from .prompted_clip import PromptedCLIP

__all__ = ["AVSTFPConfig", "PromptedCLIP"]
