"""The quick-start demo: needs no data and no weights.

1. builds PromptedCLIP for ViT-B/16 (random open_clip tower) and prints its parameters;
2. checks the fast path against the literal reference on the same weights;
3. runs a few training steps on synthetic audio-visual clips with every backend that
   can run on this machine and prints a table (median step time, loss).  On a CPU the steps use
   the tiny tower (a ViT-B/16 step takes tens of seconds on 2 cores); on a GPU, ViT-B/16.

``python -m avstfp_fast.demo [--backbone ViT-B-16|tiny] [--train-backbone ...] [--steps 3]``
"""
from __future__ import annotations

import argparse
import time

import torch

from .models.prompted_clip import LITERAL_BACKEND, LITERAL_BACKENDS, PromptedCLIP
from .ops.backends import KernelBackend, backend_names, get_backend
from .ops.contract import make_problem


def _backends_here(model, device: torch.device):
    """Backends that can run the model on this device, the literal reference first.
    Kernel backends are tried on a GPU only (the Triton interpreter is far too slow for
    a demo), and only when they accept an attention problem shaped like the model's."""
    d = model.width // model.num_heads
    q = torch.randn(1, model.num_heads, 4, d, device=device)
    pk = [torch.randn(model.num_heads, 2, d, device=device) for _ in range(2)]
    probe = make_problem(q, q, q, pk, pk, segments=(2, 2))
    out = [LITERAL_BACKEND]
    for name in backend_names():
        if name in LITERAL_BACKENDS:      # "reference" runs the literal layers too
            continue
        try:
            b = get_backend(name)
            if isinstance(b, KernelBackend) and device.type != "cuda":
                continue
            if b.why_not(probe) is None:
                out.append(name)
        except (ImportError, ValueError, RuntimeError):
            pass
    return out


def _clip_batch(model, B, M, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = model.image_size
    a = torch.randn(B, M, 98, 128, generator=g).to(device, dtype)
    v = torch.randn(B, M, 3, s, s, generator=g).to(device, dtype)
    y = torch.randint(0, model.config.num_classes, (B, M), generator=g).to(device)
    return a, v, y


def step_time(step, times, min_samples: int = 10, budget_s: float = 2.0) -> float:
    """A stable per-step time: the median of the timed steps after the first (which
    pays for warm-up), topped up with more calls of ``step()`` (returning its seconds)
    until there are ``min_samples`` of them or ``budget_s`` seconds were spent.  A
    minimum of two or three samples swings with any hiccup of a shared machine."""
    samples = list(times[1:])
    spent = sum(samples)
    while len(samples) < min_samples and spent < budget_s:
        t = step()
        samples.append(t)
        spent += t
    if not samples:
        samples = list(times)
    samples.sort()
    n = len(samples)
    return samples[n // 2] if n % 2 else 0.5 * (samples[n // 2 - 1] + samples[n // 2])


def _build(name, pretrained, device):
    if name == "tiny":
        return PromptedCLIP.tiny(beta_init=0.1).to(device)
    return PromptedCLIP(name, pretrained=pretrained, beta_init=0.1).to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="ViT-B-16", help="open_clip name, or 'tiny'")
    ap.add_argument("--pretrained", default=None, help="local CLIP checkpoint (optional)")
    ap.add_argument("--steps", type=int, default=3,
                    help="training steps per backend in the loss columns (step times are "
                         "the median of up to 10 steps)")
    ap.add_argument("--batch", type=int, default=1, help="clips per batch")
    ap.add_argument("--frames", type=int, default=2, help="segments per clip for the parity check")
    ap.add_argument("--train-backbone", default=None,
                    help="backbone for the training steps (default: tiny on CPU, --backbone "
                         "on GPU)")
    ap.add_argument("--train-frames", type=int, default=10, help="segments per clip (paper: 10)")
    ap.add_argument("--synthetic", action="store_true",
                    help="also train the tiny model on the synthetic audio-visual task "
                         "(real .mp4 files through the AVE loader; ~1 min on 2 CPU cores)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = _build(args.backbone, args.pretrained, device)
    print("== parameters")
    model.parameter_summary()

    a, v, y = _clip_batch(model, args.batch, args.frames, device)
    print(f"\n== parity: fast path vs reference ({device.type}, fp32, B={args.batch}, "
          f"M={args.frames}, {model.visual.positional_embedding.shape[0]} visual tokens)")
    with torch.no_grad():
        model.set_backend(LITERAL_BACKEND)
        ref = model(a, v)
        parity = {}
        for name in _backends_here(model, device)[1:]:
            model.set_backend(name)
            out = model(a, v)
            parity[name] = float((out - ref).norm() / ref.norm())
            print(f"  {name:8s} ||out - ref|| / ||ref|| = {parity[name]:.2e}")

    train_name = args.train_backbone or ("tiny" if device.type == "cpu" else args.backbone)
    if train_name != args.backbone:
        model = _build(train_name, None, device)
    a, v, y = _clip_batch(model, max(args.batch, 2), args.train_frames, device)
    print(f"\n== {args.steps} training steps per backend ({train_name}, B={a.shape[0]}, "
          f"M={a.shape[1]}, Adam on prompts + head)")
    init = {k: t.clone() for k, t in model.state_dict().items() if not k.startswith("visual.")}
    rows = []
    for name in _backends_here(model, device):
        model.load_state_dict(init, strict=False)
        model.set_backend(name)
        opt = torch.optim.Adam(model.param_groups(3e-4, 3e-4), weight_decay=0.0)
        times, losses = [], []

        def step():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(a, v)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step.loss = loss.item()
            return time.perf_counter() - t0
        for _ in range(args.steps):
            times.append(step())
            losses.append(step.loss)
        # the loss columns are the first --steps steps; the time is a median over more
        rows.append((name, step_time(step, times), losses[0], losses[-1]))
    ref_t = rows[0][1]
    print(f"  {'backend':9s} {'step (s)':>9s} {'vs ref':>7s} {'loss[0]':>8s} {'loss[-1]':>8s}")
    for name, t, l0, l1 in rows:
        print(f"  {name:9s} {t:9.3f} {ref_t / t:6.2f}x {l0:8.4f} {l1:8.4f}")
    print("\nAll backends start from the same weights; losses agree to rounding.")
    if args.synthetic:
        from .train import run_synthetic
        print("\n== synthetic AVE-style task (tiny tower, torch backend)")
        r = run_synthetic(backend="torch")
        print(f"  val segment accuracy {r['val_acc']:.1%}, test {r['test_acc']:.1%}, "
              f"{r['steps']} steps in {r['wall_s']:.0f} s  (run folder: {r['run_dir']})")
    return rows


if __name__ == "__main__":
    main()
