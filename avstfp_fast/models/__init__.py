"""AV-STFP models: configuration, the frozen tower helpers, the literal (reference.py) and
fast (fast.py) layers side by side, and PromptedCLIP, which runs either."""
from .config import AVSTFPConfig
from .prompted_clip import PromptedCLIP, ReferenceAVSTFP

__all__ = ["AVSTFPConfig", "PromptedCLIP", "ReferenceAVSTFP"]
