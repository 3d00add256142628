"""``--compile-mode`` of the trainer and avstfp-predict: torch.compile modes, the CUDA-graph
ones refused off the GPU with a one-line error (exit 2)."""
from __future__ import annotations

import pytest

from avstfp_fast.predict.cli import main as predict_main
from avstfp_fast.train.config import COMPILE_MODES, TrainConfig, check_compile_mode


def test_config_validates_and_implies_compile():
    c = TrainConfig(compile_mode="reduce-overhead")
    assert c.compile and c.compile_mode == "reduce-overhead"
    assert not TrainConfig().compile and TrainConfig().compile_mode is None
    with pytest.raises(ValueError, match="compile_mode: expected one of"):
        TrainConfig(compile_mode="fast")


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_cuda_graph_modes_need_a_gpu(mode):
    check_compile_mode(mode, "cuda:0")
    if mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="needs a CUDA device, got device 'cpu'"):
            check_compile_mode(mode, "cpu")
    else:
        check_compile_mode(mode, "cpu")


def test_predict_refuses_cuda_graphs_on_cpu_in_one_line(capsys):
    rc = predict_main(["missing.pt", "x.mp4", "--compile-mode", "reduce-overhead",
                       "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "compile_mode" in err[0], err
