"""Data floor below the trainer and avstfp-predict: media decoding (:mod:`.media`)."""
from .media import BadSample, decode_clip

__all__ = ["BadSample", "decode_clip"]
