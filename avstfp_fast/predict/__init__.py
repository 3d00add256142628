"""Use a trained model: ``avstfp-predict`` / ``python -m avstfp_fast.predict``.

From Python::

    from avstfp_fast.predict import load_model, Predictor, plot_timeline
    lm = load_model("runs/x/checkpoints/best.prompts.safetensors")   # or best.pt
    results = []
    Predictor(lm, progress=False).run([("clip.mp4", None, "clip")], results.append)
    fig = plot_timeline(results[0])            # a matplotlib Figure (shows in notebooks)

Modules: ``core`` (loading prompt files and checkpoints, finding videos, batched
inference, event segments), ``timeline`` (the pictures), ``cli``.
"""
from .core import (BACKGROUND, VIDEO_EXTENSIONS, LoadedModel, Predictor, event_segments,
                   find_videos, load_model)
from .timeline import load_frames, plot_timeline

__all__ = ["load_model", "LoadedModel", "Predictor", "find_videos", "event_segments",
           "plot_timeline", "load_frames", "VIDEO_EXTENSIONS", "BACKGROUND", "main"]


def main(argv=None) -> int:
    from .cli import main as _main
    return _main(argv)
