"""mlx-lm as the runtime for MLX artifacts: `mlx_lm.load`, logits from the model, greedy tokens from mlx-lm's own
generate path (`generate_step`, which decodes through its KV cache).

How mlx sums a quantized matmul depends on the device. Its Metal kernels (Apple silicon, where MLX artifacts run)
widen every product to float32 and sum in float32; its CPU kernels sum in the activations' dtype, bfloat16 for a
bf16 model, so each output carries the rounding of hundreds of bf16 additions: on a 1,536-wide Q8G64 matmul the
largest error is about 8% of the largest output, against 0.3% for mlx's own bf16 matmul of the same weights. On a
CPU, `accumulate="float32"` runs mlx's quantized kernels (`quantized_matmul`, `gather_qmm`) on float32 copies of
the activations, scales and biases and rounds the result back to the activations' dtype: the Metal kernels'
arithmetic, on the artifact's stored weights, unchanged. The default, "native", runs mlx as it is.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from ..errors import Gemma4ExportError


def check_safetensors(directory: Path) -> None:
    """Open every shard with the safetensors library, which rejects overlapping or holey files that mx.load would
    accept, and check that the index and the files agree."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise Gemma4ExportError(f"{directory}: no safetensors weights")
    seen: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    seen[k] = f.name
        except Exception as e:  # the library's own error, whatever its type
            raise Gemma4ExportError(f"{f}: not a valid safetensors file ({e})") from None
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        if wm != seen:
            raise Gemma4ExportError(f"{index}: does not match the shards' contents")


def artifact_info(path: Path):
    from .harness import ArtifactInfo

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Gemma4ExportError(f"{path}/config.json: unreadable ({e})") from None
    meta = cfg.get("gemma4_export")
    if not meta or meta.get("target") != "mlx":
        raise Gemma4ExportError(f"{path}: not an MLX directory written by gemma4-export")
    check_safetensors(path)
    return ArtifactInfo(meta["preset"], {"general.name": meta.get("source"), **meta})


def widen_experts_for_cpu(model) -> int:
    """MLX's CPU GatherMM (unquantized MoE experts) only takes float32: on the CPU, widen those weights (exact,
    bf16 -> f32; quantized experts, gather_qmm, run as stored). Returns how many were widened."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return 0
    n = 0
    for _, m in model.named_modules():
        if type(m).__name__ == "SwitchLinear" and m.weight.dtype != mx.float32:
            m.weight = m.weight.astype(mx.float32)
            n += 1
    return n


ACCUMULATE = ("native", "float32")


@contextmanager
def float32_sums(mx):
    """While inside: mlx's quantized matmuls sum in float32 and return the activations' dtype (see the module's
    docstring). mlx-lm's layers look the functions up on mlx.core at each call, so they run the wrapped ones."""
    f32 = mx.float32

    def wrap(fn):
        def run(x, w, scales, biases=None, *args, **kwargs):
            if kwargs.get("mode", "affine") != "affine":  # microscaled formats: their scales are not floats
                return fn(x, w, scales, biases, *args, **kwargs)
            wide = None if biases is None else biases.astype(f32)
            return fn(x.astype(f32), w, scales.astype(f32), wide, *args, **kwargs).astype(x.dtype)
        return run

    saved = mx.quantized_matmul, mx.gather_qmm
    mx.quantized_matmul, mx.gather_qmm = wrap(saved[0]), wrap(saved[1])
    try:
        yield
    finally:
        mx.quantized_matmul, mx.gather_qmm = saved


class MLXRunner:
    name = "mlx-lm"

    def __init__(self, path: Path, device: str = "cpu", accumulate: str = "native"):
        try:
            import mlx.core as mx
            import mlx_lm
        except ImportError:
            raise Gemma4ExportError("validating MLX needs mlx and mlx-lm: pip install 'gemma4-export[mlx]'") from None
        if device in ("gpu", "mps", "metal"):
            if not mx.metal.is_available():
                raise Gemma4ExportError(f"--device {device}: MLX has no Metal GPU here")
            mx.set_default_device(mx.gpu)
        elif device == "cpu":
            mx.set_default_device(mx.cpu)
        else:
            raise Gemma4ExportError(f"--device {device}: MLX runs on cpu, or on gpu (Metal, Apple Silicon)")
        if accumulate not in ACCUMULATE:
            raise Gemma4ExportError(f"--accumulate {accumulate}: one of {', '.join(ACCUMULATE)}")
        if accumulate != "native" and mx.default_device() != mx.cpu:
            raise Gemma4ExportError(f"--accumulate {accumulate}: for mlx's CPU kernels; its Metal kernels already "
                                    "sum in float32")
        self.accumulate = accumulate
        self.mx, self.device = mx, str(mx.default_device())
        self.model, self.tokenizer = mlx_lm.load(str(path))
        self._version = mlx_lm.__version__
        n = widen_experts_for_cpu(self.model)
        self.note = f"{n} unquantized expert weights widened to float32 (MLX CPU GatherMM)" if n else None

    def describe(self) -> dict:
        d = {"runtime": f"mlx-lm {self._version} (mlx {self.mx.__version__})", "device": self.device}
        if self.accumulate == "float32":
            d["accumulate"] = ("float32: mlx's quantized matmuls run on float32 copies of their operands, the result "
                               "rounded to the activations' dtype (the Metal kernels' arithmetic)")
        if self.note:
            d["note"] = self.note
        return d

    def _sums(self):
        return float32_sums(self.mx) if self.accumulate == "float32" else nullcontext()

    def logits(self, ids: list[int]) -> np.ndarray:
        with self._sums():
            out = self.model(self.mx.array([ids]))[0].astype(self.mx.float32)
            return np.array(out)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        from mlx_lm.generate import generate_step

        out = []
        with self._sums():
            for tok, _ in generate_step(self.mx.array(ids), self.model, max_tokens=n):  # default sampler: argmax
                out.append(int(tok))
        return out

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

