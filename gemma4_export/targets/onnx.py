"""ONNX target: a decoder graph for onnxruntime, with a KV cache, driven token by token by an application.

The directory `<name>-onnx-<preset>/` holds model.onnx (the graph), model.onnx.data (every weight, as external
data, so models over 2 GB load), inference_config.json (inputs, outputs, cache layout, special tokens, chat
template: what an app needs to run it) and the tokenizer files. Weights stream from the checkpoint into their
place in model.onnx.data while the graph is built (onnx_decoder.py over onnx_ops.py); int8/int4 weights are block-quantized
as the plan says, into MatMulNBits (matrices) and GatherBlockQuantized (lookup tables): by onnxruntime's own quantizer,
or, for matrices the calibration has statistics for, with each block's scale chosen to minimise the
importance-weighted error (quant/weighted.py), in the same layout.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import Gemma4ExportError
from ..exporter.checkpoint import Checkpoint, to_f32
from ..exporter.source import ModelSource
from ..exporter.tokenizer import read_tokenizer
from ..quant.plan import Plan
from ..quant.presets import Preset
from ..quant.types import ONNX_TYPES
from . import copy_tokenizer_files
from .registry import Platform, Target, register
from .onnx_decoder import Weights, build_decoder, cache_names
from .onnx_ops import OPSET, QUANT_BITS, Graph, WeightFile

MODEL_FILE, DATA_FILE, CONFIG_FILE = "model.onnx", "model.onnx.data", "inference_config.json"
IR_VERSION = 10  # what onnxruntime 1.20 and later read
BLOCK_BYTES = 32 << 20


class ONNXExportError(Gemma4ExportError):
    pass


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ONNXExportError("the ONNX target needs onnx and onnxruntime: pip install 'gemma4-export[onnx]'") \
            from None


def _weights(ck: Checkpoint, plan: Plan) -> Weights:
    entries = plan.by_name()

    def type_of(name: str) -> str:
        e = entries.get(name)
        if e is None or e.dropped:
            raise ONNXExportError(f"the graph needs {name}, which the plan does not keep")
        return e.type

    def blocks(name: str):
        dtype = ck.info(name).dtype

        def gen():
            for _, raw in ck.iter_rows(name, BLOCK_BYTES // 2):  # about BLOCK_BYTES once widened to float32
                yield to_f32(raw, dtype)
        return gen

    def vector(name: str) -> np.ndarray:
        info = ck.info(name)
        return to_f32(ck.raw(name), info.dtype).reshape(-1)

    def expert_down(name: str):
        """experts.down_proj [E, H, I] as rows of [H, E*I] (each output row holds every expert's row side by side),
        read a block of output rows at a time: E positioned reads per block, never the whole tensor."""
        info = ck.info(name)
        e, h, i = info.shape
        per = max(1, BLOCK_BYTES // (e * i * 4))

        def gen():
            for r in range(0, h, per):
                stop = min(h, r + per)
                parts = [to_f32(ck.rows(name, x * h + r, x * h + stop), info.dtype) for x in range(e)]
                yield np.stack(parts, axis=1).reshape(stop - r, e * i)
        return gen

    return Weights(type_of, blocks, vector, expert_down, ck.text_prefix)


def inference_config(src: ModelSource, plan: Plan) -> dict:
    """What an application needs to drive the graph: names, shapes, the cache layout, tokens, the chat template."""
    a = src.arch
    tok = read_tokenizer(src.directory, a.vocab_size)
    cache, shared = [], []
    for i in range(a.num_layers):
        if a.is_kv_shared(i):
            shared.append({"layer": i, "reads_layer": a.kv_donor(i)})
            continue
        pk, pv, ok, ov = cache_names(i)
        cache.append({"layer": i, "type": a.layer_types[i], "kv_heads": a.layer_kv_heads(i),
                      "head_dim": a.layer_head_dim(i), "past_key": pk, "past_value": pv, "present_key": ok,
                      "present_value": ov,
                      "sliding_window": a.sliding_window if a.layer_types[i] == "sliding_attention" else None})
    meta = {"version": __version__, "preset": plan.preset, "target": "onnx", "source": src.name,
            "ple_type": plan.ple_type, "overrides": plan.overrides}
    # name, hub id, base and adapter; never a local path (ModelSource.provenance)
    meta.update({k: v for k, v in src.provenance().items() if k != "name"})
    return {
        "format": "gemma4-export onnx decoder",
        "model": MODEL_FILE,
        "external_data": DATA_FILE,
        "opset": OPSET,
        "inputs": {
            "input_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
            "attention_mask": {"dtype": "int64", "shape": ["batch", "past_sequence + sequence"],
                               "doc": "1 for real tokens, 0 for padding, over the cached and the new tokens"},
            "position_ids": {"dtype": "int64", "shape": ["batch", "sequence"],
                             "doc": "positions of the new tokens (past_sequence + 0, 1, ...; shift for left padding)"},
        },
        "outputs": {"logits": {"dtype": "float32", "shape": ["batch", "sequence", a.vocab_size],
                               "doc": "after final softcapping"}},
        "kv_cache": {
            "dtype": "float32",
            "layout": ["batch", "kv_heads", "sequence", "head_dim"],
            "doc": "feed each present.* output back as the matching past_key_values.* input; start with sequence 0. "
                   "Every layer keeps its whole history; sliding layers mask it to their window.",
            "layers": cache,
            "kv_shared_layers": shared,
        },
        "vocab_size": a.vocab_size,
        "context_length": a.max_position_embeddings,
        "bos_token_id": tok.bos_id,
        "eos_token_ids": list(tok.eos_ids),
        "pad_token_id": tok.pad_id,
        "add_bos": tok.add_bos,
        "chat_template": tok.chat_template,
        "quantization": {"method": "onnxruntime MatMulNBits / GatherBlockQuantized", "block_size": 32,
                         "symmetric": True} if any(e.type in QUANT_BITS for e in plan.kept) else None,
        "gemma4_export": meta,
    }


def _model(g: Graph, src: ModelSource, plan: Plan):
    from onnx import helper

    graph = helper.make_graph(g.nodes, f"{src.name}-decoder", g.inputs, g.outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="gemma4-export", producer_version=__version__)
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"gemma4_export.preset": plan.preset, "gemma4_export.source": src.name})
    return model


@register
class ONNXTarget(Target):
    name = "onnx"
    description = "a directory with an ONNX decoder graph (KV cache) for onnxruntime"
    runtime_name = "onnxruntime"
    extra = "onnx"
    types = ONNX_TYPES
    default_preset = "int4"
    artifact_kind = "directory"
    color = "#2ca02c"
    devices_help = "cpu, cuda (CUDA provider) or mps (CoreML)"

    def require(self) -> None:
        _require_onnx()

    def artifact_name(self, source: str, preset: Preset, group_size: int | None = None) -> str:
        return f"{source}-onnx-{preset.name}"

    def write(self, job) -> None:
        t0 = time.perf_counter()
        tmp, plan, src = job.path, job.plan, job.source
        total = plan.total_bytes  # the tied head reads the embedding's own bytes
        fd = os.open(tmp / DATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with job.reporter.task(f"export {plan.preset} (onnx)", total) as task:
                g = Graph(WeightFile(fd, DATA_FILE), advance=task.advance)
                if job.importance is not None:
                    g.importance = lambda name: job.importance.for_tensor(name, job.checkpoint.text_prefix)
                build_decoder(g, src.arch, _weights(job.checkpoint, plan))
        finally:
            os.close(fd)
        job.seconds["weights"] = time.perf_counter() - t0
        model = _model(g, src, plan)
        (tmp / MODEL_FILE).write_bytes(model.SerializeToString())
        _check_model(tmp / MODEL_FILE)
        check_quantized(g.quantized, plan)
        cfg = inference_config(src, plan)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        copy_tokenizer_files(job.checkpoint.dir, tmp)

    def recognises(self, path: Path) -> bool:
        return (path.is_file() and path.suffix == ".onnx") or (path.is_dir() and any(path.glob("*.onnx")))

    def artifact_info(self, path: Path):
        from ..validate.onnxrt import artifact_info

        return artifact_info(path)

    def make_runner(self, path: Path, spec, device: str, preset: str):
        from ..validate.onnxrt import make_runner

        return make_runner(path, spec, device, preset)

    def runtime_checks(self, runner, prompt_ids, n):
        from ..validate.onnxrt import runtime_checks

        return runtime_checks(runner, prompt_ids, n)

    def probe(self) -> dict | None:
        import onnxruntime

        return {"providers": tuple(onnxruntime.get_available_providers())}

    def skip_reason(self, device: str, platform: Platform) -> str | None:
        from ..validate.onnxrt import PROVIDERS

        facts = platform.runtime(self.name)
        if facts is None:
            return self.not_installed()
        want = PROVIDERS[device]
        if want not in facts["providers"]:
            return f"onnxruntime here has no {want} (it has {', '.join(facts['providers']) or 'none'})"
        return None

    def backend(self, device: str) -> str:
        from ..validate.onnxrt import PROVIDERS

        return f"onnxruntime, {PROVIDERS[device]}"


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ONNXExportError(f"the written graph is not valid ONNX: {e}") from None


def quantized_weights(model) -> dict[str, tuple[str, int]]:
    """{(checkpoint tensor name, operator): bits} for every block-quantized weight of a model proto (the tied head
    is a MatMulNBits view, named '<embedding>.head', of the embedding's bytes)."""
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        bits = next(a.i for a in n.attribute if a.name == "bits")
        data = n.input[1] if n.op_type == "MatMulNBits" else n.input[0]
        out[(data.removesuffix(f".q{bits}").removesuffix(".head"), n.op_type)] = bits
    return out


def check_quantized(nodes, plan: Plan) -> None:
    """Every quantized weight in the graph has the plan's type, and every weight the plan quantizes is quantized."""
    got = {q.source: q.bits for q in nodes}
    want = {e.name: QUANT_BITS[e.type] for e in plan.kept if e.type in QUANT_BITS}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise ONNXExportError(f"quantized weights differ from the plan: {diff[:6]}")
