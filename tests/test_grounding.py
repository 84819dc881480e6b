"""The shipped tiny checkpoints' towers are trained: their soft tokens name what code-made images and clips hold
(gemma4_export/tiny/grounding.py), decoded by the nearest class embedding on held-out inputs at the validation's
sizes; towers with random weights of the same scale do not."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4_export.exporter.variants import TINY_DIR
from gemma4_export.tiny import grounding as G

# Measured by scripts/build_tiny.py --towers 400 --batch 4 (training.json): tiny-e2b image 0.998, audio 0.998;
# tiny-26b-a4b 0.998; tiny-31b 1.0; tiny-12b 0.82 (its patch embedder normalises each 48-pixel patch over its
# values, so a black patch and a white one, equal in every channel, differ only by the pixel noise). Untrained:
# 0.11-0.24. Chance is 1/6 (image), 1/3 (audio).
FLOORS = {"tiny-e2b": {"image": 0.95, "audio": 0.95}, "tiny-26b-a4b": {"image": 0.95},
          "tiny-31b": {"image": 0.95}, "tiny-12b": {"image": 0.7}}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_towers_name_what_they_see(name):
    acc = G.grounding_accuracy(TINY_DIR / name)
    for kind, floor in FLOORS[name].items():
        assert acc[kind] >= floor, (name, kind, acc)
    # the unified model's audio embedder (one linear map of raw frames) is left as initialised: near chance
    if name == "tiny-12b":
        assert acc["audio"] < 0.5, acc
    report = json.loads((TINY_DIR / name / "training.json").read_text())["towers"]
    assert report["steps"] > 0 and set(report["heldout_token_accuracy"]) == set(acc)


@pytest.mark.parametrize("dst, src", [("tiny-e2b-ft", "tiny-e2b"), ("tiny-e2b-qat", "tiny-e2b"),
                                      ("tiny-26b-a4b-qat", "tiny-26b-a4b")])
def test_derived_checkpoints_carry_the_trained_towers(dst, src):
    def towers(name):
        out = {}
        for sh in sorted((TINY_DIR / name).glob("*.safetensors")):
            out.update({k: v for k, v in load_file(str(sh)).items() if not k.startswith("model.language_model.")})
        return out

    a, b = towers(src), towers(dst)
    assert a and sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_towers_do_not(tmp_path):
    """The negative control: tiny-31b with each vision tensor replaced by Gaussian noise of its own mean and spread
    decodes near chance, so the floors above measure training, not the decoding."""
    src = TINY_DIR / "tiny-31b"
    dst = tmp_path / "tiny-31b-random"
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(0)
    for sh in sorted(dst.glob("*.safetensors")):
        sd = load_file(str(sh))
        for k, v in sd.items():
            if not k.startswith("model.language_model.") and v.ndim >= 2:
                f = v.float()
                sd[k] = (f.mean() + f.std() * torch.randn(f.shape, generator=gen)).to(v.dtype)
        save_file(sd, str(sh), metadata={"format": "pt"})
    acc = G.grounding_accuracy(dst)
    assert acc["image"] < 0.5, acc
