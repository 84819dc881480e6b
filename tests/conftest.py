"""Tests never touch the network: the hub and transformers are put offline before anything imports them."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Calibration statistics are cached per checkpoint: one cache for this test session, never the user's.
# The session's own cache is removed when the session ends (it grows to hundreds of MB of statistics).
if "GEMMA4_EXPORT_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["GEMMA4_EXPORT_CACHE"] = tempfile.mkdtemp(prefix="gemma4-export-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GEMMA4_EXPORT_CACHE"], ignore_errors=True)
# Exports under 8 bits calibrate by default, and the suite makes many checkpoints (every layout, adapters), each
# calibrated afresh: 2 chunks of 1024 tokens test the same code as the default 16 (thresholds were measured with 16).
os.environ.setdefault("GEMMA4_EXPORT_CALIBRATION_CHUNKS", "2")

import pytest  # noqa: E402

from gemma4_export.exporter.variants import TINY, VARIANTS  # noqa: E402

REAL = [n for n, v in VARIANTS.items() if not v.tiny and not v.instruction_tuned]
# Quantized MLX presets are validated on 2 of the standard windows and 4 of its prompts: mlx's CPU build multiplies
# quantized matrices about 5x slower than bf16 ones (a full tiny-e2b 4bit validation took 211 s, 147 of them on the
# 8 windows); scripts/calibrate.py --target mlx runs the full standard evaluation of every preset.
MLX_QUANT_WINDOWS, MLX_QUANT_PROMPTS = 2, 4


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite the golden plan files")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")


@pytest.fixture(params=TINY)
def tiny(request):
    return request.param


def genai_greedy(model, n: int, ids=None, inputs=None) -> list[int]:
    """onnxruntime-genai's greedy tokens from an og.Model: after token `ids`, or after `inputs` (its processor's
    NamedTensors, or tensors set by hand), `n` new tokens (fewer at an end-of-sequence token)."""
    import onnxruntime_genai as og

    length = len(ids) if ids is not None else inputs["input_ids"].as_numpy().shape[1]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length + n, do_sample=False)
    gen = og.Generator(model, params)
    if inputs is not None:
        gen.set_inputs(inputs)
    else:
        gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
