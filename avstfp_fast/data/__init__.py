"""Data floor below the trainer and avstfp-predict: media decoding (:mod:`.media`),
prepared WebDataset shards (:mod:`.shards`: format, manifest, random-access reader) and
the preparation engine behind ``avstfp-prepare`` (:mod:`.prepare`).  Nothing here
imports ``train`` or ``predict``."""
from .media import BadSample, decode_clip

__all__ = ["BadSample", "decode_clip"]
