"""Model factory of the end-to-end and CPU cases: randomly initialised PromptedCLIP
towers, random batches, a training step and an inference call, torch.compile limits."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from geometry import AUDIO_F, AUDIO_T, FRAMES

OPEN_CLIP_NAMES = {"B16": "ViT-B-16", "L14": "ViT-L-14"}
# CPU configurations of PromptedCLIP.tiny: "tiny" is the CI default tower; "small" is a
# slightly bigger one (head dim 64, 7x7 visual grid) for the CPU speed ratio.
SMALL_MODELS = {"tiny": dict(), "small": dict(width=256, layers=4, heads=4, image_size=112)}


def make_model(arch: str, device, backend: str = "reference"):
    """A randomly initialised PromptedCLIP (task AVE) on ``device`` (weights never
    downloaded)."""
    from avstfp_fast import PromptedCLIP
    if arch in OPEN_CLIP_NAMES:
        m = PromptedCLIP(OPEN_CLIP_NAMES[arch], pretrained=None, task="ave", backend=backend,
                         device=device)
    else:
        m = PromptedCLIP.tiny(task="ave", backend=backend, **SMALL_MODELS[arch])
    return m.to(device)


def make_batch(model, batch: int, device, seed: int = 0, frames: int = FRAMES):
    """Random normalised fbank (B, M, 98, 128), frames (B, M, 3, S, S), AVE labels (B, M)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = model.image_size
    audio = torch.randn(batch, frames, AUDIO_T, AUDIO_F, generator=g).to(device)
    video = torch.randn(batch, frames, 3, S, S, generator=g).to(device)
    labels = torch.randint(0, model.config.num_classes, (batch, frames), generator=g).to(device)
    return audio, video, labels


def train_step_fn(model, forward, audio, video, labels, autocast_dtype=None):
    """One optimisation step: zero grads, forward (optionally under autocast), CE loss,
    backward, Adam step.  Returns the step function (it returns nothing)."""
    opt = torch.optim.Adam(model.param_groups(3e-4, 3e-4, 0.0))
    dev = audio.device.type

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = forward(audio, video)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
    return step


def infer_fn(forward, audio, video, autocast_dtype=None):
    dev = audio.device.type

    def run():
        with torch.no_grad(), torch.autocast(dev, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            forward(audio, video)
    return run


def raise_dynamo_limits(n: int = 256) -> None:
    """Every benchmark shape compiles its own graph: lift dynamo's recompile limits so
    that no case silently falls back to eager."""
    import torch._dynamo as dynamo
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), n))
