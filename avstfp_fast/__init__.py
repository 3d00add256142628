"""avstfp_fast: fused prompted-attention kernels and the AV-STFP model built on them."""
from .ops import explain, prompted_attention, prompted_attention_qkv

__version__ = "0.1.0"

_LAZY = {
    "PromptedCLIP": "avstfp_fast.models.prompted_clip",
    "AVSTFPConfig": "avstfp_fast.models.config",
    "ReferenceAVSTFP": "avstfp_fast.models.prompted_clip",
}


def __getattr__(name):   # models import open_clip (slow); load them on first use
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'avstfp_fast' has no attribute {name!r}")


__all__ = ["prompted_attention", "prompted_attention_qkv", "explain", *_LAZY]
