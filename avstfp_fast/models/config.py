"""Configuration of an AV-STFP model: prompt counts, stage and modality switches, heads."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import NamedTuple, Optional, Tuple

STAGES = ("temporal", "spatial", "fusion")
MODALITIES = ("audio", "visual")
# Fields configs once had and no longer do: accepted on load, dropped.
LEGACY_FIELDS = ("extra",)
TASK_CLASSES = {"ave": 29, "avar": 32}


class PromptKind(str, Enum):
    """The four kinds of learnable prompt (the value is the parameter-name prefix)."""
    TEMPORAL_KEY = "temporal_key"
    TEMPORAL_VALUE = "temporal_value"
    SPATIAL = "spatial"
    FUSION = "fusion"


class PromptKey(NamedTuple):
    """One prompt tensor of the model: its kind and modality ("audio"/"visual"; None for
    the fusion prompts, which both modalities share).  Hashable, so it keys dicts."""
    kind: PromptKind
    modality: Optional[str] = None

    @property
    def param_name(self) -> str:
        """The parameter holding these prompts for every layer, shape (L, n, D)."""
        if self.kind is PromptKind.FUSION:
            return "fusion_prompts"
        return f"{self.kind.value}_{self.modality}"


@dataclass
class AVSTFPConfig:
    """Every switch of the paper's ablations (docs/design.md, "The model").

    n_temporal / n_spatial / n_fusion: prompts per layer of each kind (0 = the stage still
    runs, unprompted).  ``stages``: which stages run at all.  ``modalities``: audio-only,
    visual-only or both (fusion needs both).  ``full_finetune``: the CLIP tower trains too.
    ``beta_init``: initial value of the learnable gates β_a, β_v, β_av.  Default 0.0: at
    step 0 the temporal and fusion stages add nothing, so the model starts as the frozen
    image tower plus spatial prompts (β still receives gradient and opens the gates).
    ``task``: "ave" (per-segment logits), "avar" (clip-level logits) or None (features).
    """
    n_temporal: int = 2
    n_spatial: int = 10
    n_fusion: int = 2
    stages: Tuple[str, ...] = STAGES
    modalities: Tuple[str, ...] = MODALITIES
    full_finetune: bool = False
    beta_init: float = 0.0
    task: Optional[str] = "ave"
    num_classes: Optional[int] = None
    head_hidden: int = 512
    prompt_init_std: float = 0.02

    def __post_init__(self):
        self.stages = tuple(self.stages)
        self.modalities = tuple(self.modalities)
        for name in ("n_temporal", "n_spatial", "n_fusion"):
            n = getattr(self, name)
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {n!r}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"stages: unknown {bad}; expected a subset of {STAGES}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(f"modalities: expected a non-empty subset of {MODALITIES}, "
                             f"got {self.modalities}")
        if "fusion" in self.stages and len(self.modalities) < 2:
            raise ValueError(f"stages: 'fusion' needs both modalities, got modalities="
                             f"{self.modalities}; drop 'fusion' from stages")
        if self.task is not None and self.task not in TASK_CLASSES:
            raise ValueError(f"task: expected one of {sorted(TASK_CLASSES)} or None, "
                             f"got {self.task!r}")
        if self.num_classes is None and self.task is not None:
            self.num_classes = TASK_CLASSES[self.task]

    def has(self, stage: str) -> bool:
        return stage in self.stages

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AVSTFPConfig":
        """From :meth:`to_dict` output, including configs saved while the class had an
        ``extra`` field (never read; dropped here so old prompt files and checkpoints
        load)."""
        return cls(**{k: v for k, v in d.items() if k not in LEGACY_FIELDS})
