"""One-line errors raised before any data or model work (device, backend, checkpoint
format), in the trainer and in avstfp-predict; failed runs leave an ``error`` record;
resuming with more epochs stretches the schedule."""
import json
import logging
import os

import pytest
import torch

from avstfp_fast.predict.cli import main as predict_main
from avstfp_fast.train import checkpoint as ck
from avstfp_fast.train.cli import main as train_main
from avstfp_fast.train.schedule import warmup_cosine_lr
from avstfp_fast.train.synthetic import make_synthetic_ave

TINY = ["--task", "synthetic", "--no-progress", "--threads", "1", "--synthetic-train", "4",
        "--synthetic-val", "2", "--synthetic-test", "0", "--batch-size", "2"]


def _one_line_error(capsys, prog):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _no_gpu():
    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_gpu(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_trainer_device_without_it_is_one_line_before_any_data(device, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(TINY + ["--out", str(out), "--device", device]) == 2
    line = _one_line_error(capsys, "avstfp-train")
    assert "--device" in line and "not available" in line
    assert not out.exists()                  # no run folder, no generated data


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backend_on_cpu_is_one_line_before_any_data(backend, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "run"
    assert train_main(TINY + ["--out", str(out), "--device", "cpu", "--backend", backend]) == 2
    line = _one_line_error(capsys, "avstfp-train")
    assert "--backend" in line and backend in line
    assert not out.exists()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from avstfp_fast import PromptedCLIP
    base = tmp_path_factory.mktemp("m")
    m = PromptedCLIP.tiny(backend="torch", task="ave", num_classes=3)
    return m.save_prompts(str(base / "p.safetensors"), backbone="tiny", include_backbone=True)


@pytest.mark.skipif(not _no_gpu(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--device", "mps"],
                                   ["--device", "cpu", "--backend", "cuda"],
                                   ["--device", "cpu", "--backend", "triton"]])
def test_predict_device_and_backend_are_one_line(extra, model_file, tmp_path, capsys,
                                                 monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "out"
    assert predict_main([model_file, str(tmp_path), "--out", str(out), "--no-progress"]
                        + extra) == 2
    _one_line_error(capsys, "avstfp-predict")
    assert not out.exists()


def test_torchscript_or_foreign_checkpoint_is_one_line(tmp_path, capsys, model_file):
    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1
    ts = str(tmp_path / "model.pt")
    torch.jit.save(torch.jit.script(M()), ts)
    out = tmp_path / "run"
    assert train_main(TINY + ["--out", str(out), "--resume", ts]) == 2
    assert "not an avstfp_fast training checkpoint" in _one_line_error(capsys, "avstfp-train")
    assert not out.exists()
    assert predict_main([ts, str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress",
                         "--device", "cpu"]) == 2
    _one_line_error(capsys, "avstfp-predict")


def test_failed_run_writes_an_error_record(tmp_path, capsys):
    data = tmp_path / "empty_ave"
    data.mkdir()
    out = tmp_path / "run"
    assert train_main(["--task", "ave", "--backbone", "tiny", "--data-root", str(data),
                       "--out", str(out), "--no-progress", "--device", "cpu"]) == 2
    _one_line_error(capsys, "avstfp-train")
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert recs[-1]["kind"] == "error" and "Annotations.txt" in recs[-1]["message"]
    s = json.load(open(out / "summary.json"))
    assert s["status"] == "error" and s["error_type"] == "FileNotFoundError"


def test_resume_with_more_epochs_stretches_the_schedule(tmp_path, capsys):
    data = str(tmp_path / "data")
    make_synthetic_ave(data, n_events=2, n_train=4, n_val=2, n_test=0, seed=1)
    args = ["--task", "synthetic", "--data-root", data, "--no-progress", "--threads", "1",
            "--batch-size", "2", "--warmup-epochs", "0", "--backend", "torch",
            "--no-final-eval"]
    one = str(tmp_path / "one")
    assert train_main(args + ["--out", one, "--epochs", "1"]) == 0
    last = os.path.join(one, "checkpoints", "last.pt")
    assert ck.load_checkpoint(last)["step"] == 2
    two = str(tmp_path / "two")
    assert train_main(args + ["--out", two, "--epochs", "2", "--resume", last]) == 0
    assert "stretched to 4 steps" in capsys.readouterr().err
    recs = [json.loads(x) for x in open(os.path.join(two, "metrics.jsonl"))]
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [3, 4]
    peak, floor = 3e-3, 2e-6      # synthetic defaults: lr_prompts 3e-3, min_lr 2e-6
    for r in steps:     # the lr used at step s (1-based) is that of the 4-step schedule
        want = warmup_cosine_lr(r["step"] - 1, peak=peak, floor=floor, warmup_steps=0,
                                total_steps=4)
        assert r["lr"]["prompts"] == pytest.approx(want)
    assert steps[0]["lr"]["prompts"] > 100 * floor       # not the old run's floor


def test_every_help_entry_has_text():
    import re

    from avstfp_fast.predict.cli import build_parser as predict_parser
    from avstfp_fast.train.cli import build_parser as train_parser
    for p in (train_parser(), predict_parser()):
        for a in p._actions:
            if a.dest == "help":
                continue
            text = re.sub(r"\(default [^)]*\)", "", a.help or "").strip()
            assert len(text) >= 3, (p.prog, a.option_strings or a.dest, a.help)


def test_default_num_workers_is_capped_by_the_cores(monkeypatch):
    from avstfp_fast.train import TrainConfig
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert TrainConfig().num_workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert TrainConfig().num_workers == 4
    assert TrainConfig(num_workers=3).num_workers == 3          # an explicit value wins


def test_open_clip_log_lines_are_silenced_while_building(caplog):
    from avstfp_fast.models import backbone as bb
    caplog.set_level(logging.DEBUG)
    bb.load_visual("ViT-S-32", device="meta")
    leaked = [r for r in caplog.records if "open_clip" in (r.pathname or "")]
    assert not leaked, [r.getMessage() for r in leaked]


def test_demo_step_time_is_a_median_robust_to_one_outlier():
    from avstfp_fast.demo import step_time
    calls = iter([0.010, 0.011, 0.5, 0.009, 0.010, 0.012, 0.010, 0.011, 0.010])
    t = step_time(lambda: next(calls), [3.0, 0.010], min_samples=10, budget_s=100)
    assert 0.009 <= t <= 0.011           # neither the warm-up step nor the 0.5 s hiccup


def test_predict_speed_excludes_the_first_batch():
    from avstfp_fast.predict.core import Predictor
    import time
    now = time.time()
    # 100 clips done; the first batch (8 clips) took 60 s (compilation), the rest 2 s
    speed = Predictor._speed(100, now - 62.0, now - 2.0, 8)
    assert 40 <= speed <= 50                 # not 100 / 62 = 1.6 (shown as "0.0"-ish)


def test_literal_backend_passes_the_preflight_and_bad_names_name_it():
    """--backend literal (the model's literal layers) needs no op backend; an unknown
    name is refused listing it."""
    from avstfp_fast.train.preflight import check_backend_on_device
    for name in ("literal", "reference", "torch", "auto"):
        check_backend_on_device(name, torch.device("cpu"))
    with pytest.raises(ValueError, match="backend: expected one of .*'literal'"):
        check_backend_on_device("fastest", torch.device("cpu"))
    from avstfp_fast.predict.cli import build_parser
    assert build_parser().parse_args(["m.safetensors", "--backend", "literal"]).backend \
        == "literal"
