"""Parameter counts and the one-screen summary of a ``PromptedCLIP`` (or subclass).

Kept out of the model class: they only read its parameters and configuration.
"""
from __future__ import annotations


def _count(params, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


def parameter_counts(model) -> dict:
    """{"prompts", "head", "backbone", "trainable", "total"}: numbers of parameters."""
    rows = {
        "prompts": _count(model.prompt_parameters()),
        "head": _count(model.head.parameters()) if model.head is not None else 0,
        "backbone": _count(model.visual.parameters()),
    }
    rows["trainable"] = _count(model.parameters(), trainable_only=True)
    rows["total"] = _count(model.parameters())
    return rows


def parameter_summary(model) -> str:
    """A header line (tower, stages, prompt counts, backend) and one line per group."""
    c, n = model.config, parameter_counts(model)
    lines = [f"PromptedCLIP({model.model_name}, L={model.num_layers}, D={model.width}, "
             f"H={model.num_heads}) stages={'+'.join(c.stages) or 'none'} "
             f"modalities={'+'.join(c.modalities)} Nt={c.n_temporal} Ns={c.n_spatial} "
             f"Nf={c.n_fusion} backend={model.backend}"]
    for name in ("prompts", "head", "backbone"):
        frozen = name == "backbone" and not c.full_finetune
        lines.append(f"  {name:10s} {n[name]:>13,d}  {'frozen' if frozen else 'trainable'}")
    lines.append(f"  {'trainable':10s} {n['trainable']:>13,d}  ({n['trainable'] / 1e6:.2f}M)")
    lines.append(f"  {'total':10s} {n['total']:>13,d}  ({n['total'] / 1e6:.2f}M)")
    return "\n".join(lines)
