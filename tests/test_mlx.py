"""MLX export: mlx-lm loads it unpatched, every module has the plan's type, and it validates in mlx-lm."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from gemma4_export.errors import Gemma4ExportError, QuantError  # noqa: E402
from gemma4_export.exporter.variants import TINY  # noqa: E402
from gemma4_export import api  # noqa: E402
from gemma4_export.validate.mlxrt import check_safetensors  # noqa: E402
from conftest import MLX_QUANT_PROMPTS, MLX_QUANT_WINDOWS  # noqa: E402

# Every tiny variant at bf16 and 4bit; 8bit on one variant. MLX's quantized kernels are slow on a 2-core CPU (a full
# validation of tiny-e2b at 8bit takes about 4 minutes), and 8bit runs the same code as 4bit with another bit width,
# so one variant covers it; scripts/calibrate.py --target mlx measures every variant at every preset.
CASES = [(v, p) for v in TINY for p in ("bf16", "4bit")] + [("tiny-31b", "8bit")]
QUANT_SPEC = ["--windows", str(MLX_QUANT_WINDOWS), "--prompts", str(MLX_QUANT_PROMPTS)]  # see conftest


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlx")


def _module_types(model) -> dict[str, object]:
    import mlx.nn as nn

    out = {}
    for path, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size"):
            out[path] = (m.bits, m.group_size)
        elif isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "SwitchLinear":
            out[path] = None
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant, preset", CASES)
def test_export_loads_and_validates(variant, preset, out_dir):
    from mlx_lm import load

    r = api.export("mlx", variant, preset, out=out_dir, force=True)
    check_safetensors(r.path)
    cfg = json.loads((r.path / "config.json").read_text())
    tc = cfg["text_config"]
    assert "per_layer_config" not in tc and tc["global_head_dim"] == 128
    assert tc["num_kv_shared_layers"] == (5 if variant == "tiny-e2b" else 0)
    towers = variant != "tiny-12b"  # mlx-vlm has no model for the unified 12B's embedders: text only there
    assert ("vision_config" in cfg) == towers and (r.path / "tokenizer.json").is_file()

    # every quantizable module is built with exactly the plan's type
    model, _ = load(str(r.path))
    got = _module_types(model)
    q = cfg.get("quantization", {})
    planned = {k: v for k, v in q.items() if k not in ("group_size", "bits", "mode")}
    if preset == "bf16":
        assert not planned and all(v is None for v in got.values())
    else:
        assert planned
        for path, want in planned.items():
            assert path in got, path
            assert got[path] == (None if want is False else (want["bits"], want["group_size"])), path
        router = [p for p in planned if p.endswith("router.proj")]
        assert all(planned[p] is False for p in router), "the MoE router stays unquantized"

    # validation in a fresh process, as a user runs it
    spec = [] if preset == "bf16" else QUANT_SPEC
    v = subprocess.run([sys.executable, "-m", "gemma4_export.cli", "validate", str(r.path), *spec],
                       capture_output=True, text=True, timeout=900)
    report = json.loads((out_dir / f"{r.path.name}.validation.json").read_text())
    assert v.returncode == 0, (report["failures"], v.stderr[-2000:])
    assert report["passed"] and report["tokenizer"]["mismatches"] == []
    assert report["spec"]["windows"] == (MLX_QUANT_WINDOWS if spec else 8)
    # and mlx-vlm ran the towers against transformers' (validate/towers.py)
    assert ("image_embeddings" in report["checks"]) == towers


def test_group_size_and_bad_choices(out_dir):
    r = api.export("mlx", "tiny-31b", "4bit", group_size=32, out=out_dir, force=True)
    assert r.path.name == "tiny-31b-mlx-4bit-g32"
    q = json.loads((r.path / "config.json").read_text())["quantization"]
    assert q["group_size"] == 32
    with pytest.raises(QuantError, match="32, 64 or 128"):
        api.export("mlx", "tiny-31b", "4bit", group_size=48, out=out_dir)
    with pytest.raises(QuantError, match="unknown mlx preset"):
        api.export("mlx", "tiny-31b", "q4_k_m", out=out_dir)
    with pytest.raises(Gemma4ExportError, match="exists"):
        api.export("mlx", "tiny-31b", "4bit", group_size=32, out=out_dir)


def test_metal_limit_is_in_the_plan():
    from gemma4_export import api

    e = api.plan("e2b", preset="bf16", target="mlx").by_name()["model.language_model.embed_tokens_per_layer.weight"]
    assert e.type == "Q8G64" and "Metal" in e.reason
    e4 = api.plan("e4b", preset="4bit", target="mlx").by_name()["model.language_model.embed_tokens_per_layer.weight"]
    assert e4.type == "Q4G64"


def test_corrupt_mlx_weights_are_caught(out_dir):
    r = api.export("mlx", "tiny-31b", "8bit", out=out_dir / "c", force=True)
    f = r.path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(Gemma4ExportError, match="not a valid safetensors file"):
        check_safetensors(r.path)


def test_float32_sums_give_the_metal_arithmetic():
    """`accumulate="float32"`: mlx's quantized kernels sum in float32 and return the activations' dtype, on the
    stored weights unchanged; outside the context mlx's own functions are back."""
    import mlx.core as mx

    from gemma4_export.validate.mlxrt import float32_sums

    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((8, 1536)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array(rng.standard_normal((4, 256, 1536)).astype(np.float32) * 0.02).astype(mx.bfloat16)
    q, s, b = mx.quantize(w, group_size=64, bits=8)
    f32 = mx.float32  # the weights as the kernel forms them: scale * code + bias, in float32
    deq = np.array(mx.dequantize(q, s.astype(f32), b.astype(f32), group_size=64, bits=8))
    xf = np.array(x.astype(mx.float32))
    exact = xf @ deq[0].T  # products and sums in float32 of the very operands mlx is given
    idx = mx.array([[2], [0]])
    exact_g = np.stack([xf[:1] @ deq[2].T, xf[:1] @ deq[0].T])

    before = mx.quantized_matmul, mx.gather_qmm
    with float32_sums(mx):
        y = mx.quantized_matmul(x, q[0], s[0], b[0], transpose=True, group_size=64, bits=8)
        g = mx.gather_qmm(x[:1], q, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=8)
        assert y.dtype == mx.bfloat16 and g.dtype == mx.bfloat16
        y, g = np.array(y.astype(mx.float32)), np.array(g.astype(mx.float32))
        # a microscaled format (uint8 scales, no biases) runs as mlx runs it
        q4, s4 = mx.quantize(w[0], mode="mxfp4")[:2]
        m = mx.quantized_matmul(x, q4, s4, transpose=True, mode="mxfp4")
    assert (mx.quantized_matmul, mx.gather_qmm) == before
    assert np.array_equal(np.array(m.astype(mx.float32)),
                          np.array(mx.quantized_matmul(x, q4, s4, transpose=True, mode="mxfp4").astype(mx.float32)))
    # only the result's rounding to bf16 is left: at most half a bf16 step (2^-8 relative) of each output
    assert np.all(np.abs(y - exact) <= np.abs(exact) * 2 ** -8 + 1e-6)
    assert np.all(np.abs(g.reshape(exact_g.shape) - exact_g) <= np.abs(exact_g) * 2 ** -8 + 1e-6)


def test_accumulate_choices(out_dir):
    from gemma4_export.validate.mlxrt import MLXRunner

    r = api.export("mlx", "tiny-31b", "4bit", out=out_dir / "acc", force=True, towers=False, calibrate=False)
    with pytest.raises(Gemma4ExportError, match="--accumulate float64: one of native, float32"):
        MLXRunner(r.path, "cpu", "float64")
    ids = list(range(2, 40))
    native, wide = MLXRunner(r.path, "cpu"), MLXRunner(r.path, "cpu", "float32")
    assert "accumulate" not in native.describe() and "Metal" in wide.describe()["accumulate"]
    a, b = native.logits(ids), wide.logits(ids)
    assert a.shape == b.shape and np.isfinite(b).all() and not np.array_equal(a, b)  # the sums differ, not the model
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    g = api.export("gguf", "tiny-31b", "q8_0", out=out_dir / "acc", force=True, towers=False)
    with pytest.raises(Gemma4ExportError, match="for MLX artifacts"):
        api.validate(g.path, variant="tiny-31b", accumulate="float32")
