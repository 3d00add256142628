"""Trainable parameter counts with the AVE head match the paper (docs/design.md,
"The model"), ±0.05M."""
import pytest

from avstfp_fast import PromptedCLIP
from avstfp_fast.models import backbone as bb

ROWS = [  # backbone, stages, paper's trainable count (millions)
    ("ViT-B-16", ("temporal", "spatial", "fusion"), 1.10),
    ("ViT-L-14", (), 1.09),
    ("ViT-L-14", ("temporal",), 1.28),
    ("ViT-L-14", ("spatial",), 1.58),
    ("ViT-L-14", ("fusion",), 1.14),
    ("ViT-L-14", ("temporal", "spatial"), 1.78),
    ("ViT-L-14", ("spatial", "fusion"), 1.63),
    ("ViT-L-14", ("temporal", "fusion"), 1.33),
    ("ViT-L-14", ("temporal", "spatial", "fusion"), 1.82),
]


@pytest.fixture(scope="module")
def towers():
    # weightless towers on the meta device: counting needs shapes only
    return {name: bb.load_visual(name, device="meta") for name in ("ViT-B-16", "ViT-L-14")}


@pytest.mark.parametrize("name,stages,paper", ROWS)
def test_trainable_count(towers, name, stages, paper):
    m = PromptedCLIP(towers[name], stages=stages, task="ave")
    n = m.parameter_counts()["trainable"]
    assert abs(n / 1e6 - paper) <= 0.05, f"{name} {stages}: {n / 1e6:.3f}M vs paper {paper}M"


def test_per_layer_prompt_formula(towers):
    """temporal 2x(Nt key + Nt value)xD, spatial 2xNsxD, fusion NfxD per layer."""
    vis = towers["ViT-L-14"]
    L, D = 24, 1024
    for stages, per_layer in [(("temporal",), 2 * (2 + 2) * D), (("spatial",), 2 * 10 * D),
                              (("fusion",), 2 * D)]:
        m = PromptedCLIP(vis, stages=stages, task=None)
        gates = {"temporal": 2, "spatial": 0, "fusion": 1}[stages[0]] * L
        assert m.parameter_counts()["prompts"] == L * per_layer + gates


def test_summary_prints(towers, capsys):
    m = PromptedCLIP(towers["ViT-B-16"])
    text = m.parameter_summary()
    assert "trainable" in capsys.readouterr().out
    assert "1.08M" in text and "frozen" in text
