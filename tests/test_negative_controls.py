"""Negative controls: plant a real defect in a written artifact and check that validation FAILS, on the metric that
should catch it. A validation that cannot fail proves nothing; these tests show that it can.

Each target gets a clean control (the unmodified artifact passes, so a failure below is the defect's doing, not the
setup's) and defects of the kinds real converters have shipped. Every defect is planted by editing the artifact's own
files, as a buggy converter would have written them:

- GGUF (f32): tensor bytes rewritten in place at the tensor's absolute data offset; a metadata value rewritten in
  place inside the serialised key/value section.
- MLX (bf16): tensor bytes rewritten in place in the safetensors shard.
- ONNX (fp32): initializer bytes rewritten in the decoder's external data at their recorded offset; small constants
  (norm weights, RoPE frequencies, the softcap) replaced in the decoder graph with the onnx library.

Float presets only, so the edits are plain float arithmetic and the clean artifact is held to float tolerances.
All on tiny-31b (the smallest tiny variant), with one fp32 reference shared by every validation.
"""

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from gemma4_export import api
from gemma4_export.exporter.variants import get_variant

pytestmark = pytest.mark.slow

VARIANT = "tiny-31b"
FFN_LAYER = 2  # a sliding-attention layer in the middle of tiny-31b's six
FINAL_SOFTCAP = 30.0  # Gemma 4's final logit softcap (tiny-31b's config)
WRONG_SOFTCAP = 50.0  # Gemma 2's attention-logit softcap, a value converters have confused with the final one


# ---- shared fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """One set of fp32 reference results for every validation in this module."""
    return api.reference(VARIANT, windows=2, prompts=2)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("negative_controls")


def _validate(path: Path, reference):
    rep = api.validate(path, variant=VARIANT, windows=2, prompts=2, write=False, reference=reference)
    lg, gm = rep.logits, rep.generation
    print(f"\n{Path(path).name}: passed={rep.passed} KLD mean={lg.kld_mean:.3g} p99.9={lg.kld_p999:.3g} "
          f"top-1={lg.top1_agreement:.4f} PPL ratio={lg.ppl_ratio:.4f} max|dlogit|={lg.max_logit_diff:.3g} "
          f"greedy exact={gm.exact_match_rate:.2f} first div={gm.mean_first_divergence:.1f}; "
          f"failures={rep.failures}")
    return rep


def _assert_caught(rep, *metrics: str) -> None:
    """Validation failed, and on each of the named metrics (substrings of the failure messages)."""
    assert rep.passed is False, "the planted defect was not caught"
    for m in metrics:
        assert any(m in f for f in rep.failures), f"{m!r} not among the failures {rep.failures}"


def _assert_clean(rep) -> None:
    assert rep.passed, rep.failures
    assert rep.failures == []


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as every bf16 converter does (finite values only)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


# ---- GGUF: in-place edits of the written file -------------------------------------------------------------------


def _gguf_tensor(path: Path, name: str):
    from gemma4_export.targets.gguf_file import read_gguf

    info = read_gguf(path).tensors[name]
    assert info.type == "F32", f"{name} is {info.type}; these edits assume f32"
    return info


def gguf_edit_tensor(path: Path, name: str, fn) -> None:
    """Rewrite an F32 tensor's bytes in place at its absolute data offset: values -> fn(values)."""
    info = _gguf_tensor(path, name)
    with open(path, "r+b") as f:
        f.seek(info.offset)
        values = np.frombuffer(f.read(info.nbytes), dtype="<f4").copy()
        new = np.asarray(fn(values), dtype="<f4")
        assert new.shape == values.shape
        f.seek(info.offset)
        f.write(new.tobytes())


def _gguf_read(path: Path, name: str) -> np.ndarray:
    info = _gguf_tensor(path, name)
    with open(path, "rb") as f:
        f.seek(info.offset)
        return np.frombuffer(f.read(info.nbytes), dtype="<f4").copy()


def gguf_swap_tensors(path: Path, a: str, b: str) -> None:
    """Exchange two same-shaped tensors' bytes in place (each name now holds the other's data)."""
    ia, ib = _gguf_tensor(path, a), _gguf_tensor(path, b)
    assert ia.shape == ib.shape and ia.nbytes == ib.nbytes
    with open(path, "r+b") as f:
        f.seek(ia.offset)
        da = f.read(ia.nbytes)
        f.seek(ib.offset)
        db = f.read(ib.nbytes)
        assert da != db
        f.seek(ia.offset)
        f.write(db)
        f.seek(ib.offset)
        f.write(da)


def gguf_set_f32_key(path: Path, key: str, value: float) -> None:
    """Rewrite a FLOAT32 metadata value inside the serialised key/value section (same size, so nothing moves)."""
    from gguf import GGUFValueType

    from gemma4_export.targets.gguf_file import read_gguf

    g = read_gguf(path)
    head_end = min(t.offset for t in g.tensors.values())
    enc = key.encode()
    pattern = struct.pack("<Q", len(enc)) + enc + struct.pack("<I", int(GGUFValueType.FLOAT32))
    with open(path, "r+b") as f:
        head = f.read(head_end)
        at = head.find(pattern)
        assert at >= 0 and head.find(pattern, at + 1) < 0, f"{key} is not one FLOAT32 key of {path}"
        f.seek(at + len(pattern))
        f.write(struct.pack("<f", value))
    assert read_gguf(path).metadata[key] == pytest.approx(value)


@pytest.fixture(scope="module")
def gguf_clean(out_dir):
    pytest.importorskip("llama_cpp")
    r = api.export("gguf", VARIANT, "f32", out_dir / "gguf", force=True)
    assert r.path.is_file()
    return r.path


def _gguf_copy(gguf_clean: Path, tmp_path: Path) -> Path:
    return _copy(gguf_clean, tmp_path / gguf_clean.name)


def test_gguf_clean_control_passes(gguf_clean, reference):
    """The unmodified f32 file passes: every failure below is the planted defect's doing."""
    rep = _validate(gguf_clean, reference)
    _assert_clean(rep)
    assert rep.logits.kld_mean < 1e-6 and rep.logits.top1_agreement == 1.0


def test_gguf_final_norm_one_plus_w_fails(gguf_clean, reference, tmp_path):
    """output_norm.weight stored as 1 + w: Gemma 1-3 converters add 1 to every RMSNorm weight because those models
    compute x * (1 + w); Gemma 4 computes x * w, so the final norm over-scales the logits (here ~1.8x before the
    softcap). Caught by the logit metrics: mean KLD, top-1 agreement, max |logit difference|."""
    p = _gguf_copy(gguf_clean, tmp_path)
    gguf_edit_tensor(p, "output_norm.weight", lambda w: 1.0 + w)
    rep = _validate(p, reference)
    _assert_caught(rep, "mean KLD", "max |logit difference|")


def test_gguf_gate_up_swapped_fails(gguf_clean, reference, tmp_path):
    """One layer's ffn_gate and ffn_up exchanged: a converter that mixes up the halves of a fused gate_up tensor
    (or the names) computes gelu(up) * gate. Caught by mean KLD and max |logit difference|."""
    p = _gguf_copy(gguf_clean, tmp_path)
    gguf_swap_tensors(p, f"blk.{FFN_LAYER}.ffn_gate.weight", f"blk.{FFN_LAYER}.ffn_up.weight")
    rep = _validate(p, reference)
    _assert_caught(rep, "mean KLD", "max |logit difference|")


def test_gguf_rope_freq_factors_dropped_fails(gguf_clean, reference, tmp_path):
    """rope_freqs.weight all 1.0: the proportional-RoPE frequency factors (1e30 = "do not rotate" for the pairs past
    partial_rotary_factor) dropped, so the full-attention layer rotates every pair. Positions are encoded wrongly
    only on the one full-attention layer: caught by mean KLD and top-1 agreement over the long windows (the short
    greedy prompts do not show it)."""
    p = _gguf_copy(gguf_clean, tmp_path)
    assert (_gguf_read(p, "rope_freqs.weight") > 1e29).any()  # there are non-rotated pairs to break
    gguf_edit_tensor(p, "rope_freqs.weight", np.ones_like)
    rep = _validate(p, reference)
    _assert_caught(rep, "mean KLD", "top-1")


def test_gguf_wrong_final_softcap_fails(gguf_clean, reference, tmp_path):
    """gemma4.final_logit_softcapping written as 50 instead of 30 (Gemma 2's attention softcap taken for the final
    one): large logits are squashed less. Caught by mean KLD and max |logit difference|."""
    p = _gguf_copy(gguf_clean, tmp_path)
    gguf_set_f32_key(p, "gemma4.final_logit_softcapping", WRONG_SOFTCAP)
    rep = _validate(p, reference)
    _assert_caught(rep, "mean KLD", "max |logit difference|")


def test_gguf_layer0_attn_norm_one_plus_w_fails(gguf_clean, reference, tmp_path):
    """blk.0.attn_norm.weight alone stored as 1 + w (a converter applying the Gemma 1-3 norm offset to one kind of
    norm only). A subtle defect: mean KLD (~8e-5) and max |logit difference| (~0.3) stay under the f32 limits, so
    it is top-1 agreement that catches it. The greedy generations show it too (one of the two prompts diverges),
    but on a near-tie of the reference, which by design is reported and not counted as a defect."""
    p = _gguf_copy(gguf_clean, tmp_path)
    gguf_edit_tensor(p, "blk.0.attn_norm.weight", lambda w: 1.0 + w)
    rep = _validate(p, reference)
    _assert_caught(rep, "top-1")
    assert rep.generation.exact_match_rate < 1.0


# ---- MLX: edits of the safetensors shard --------------------------------------------------------------------------


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def _mlx_tensor(directory: Path, name: str) -> tuple[Path, int, int, list[int]]:
    """(shard, absolute offset, nbytes, shape) of a BF16 tensor."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"][name]
    base, header = _safetensors_header(shard)
    t = header[name]
    assert t["dtype"] == "BF16", f"{name} is {t['dtype']}; these edits assume bf16"
    start, stop = t["data_offsets"]
    return shard, base + start, stop - start, t["shape"]


def mlx_edit_tensor(directory: Path, name: str, fn) -> None:
    shard, off, nbytes, _ = _mlx_tensor(directory, name)
    with open(shard, "r+b") as f:
        f.seek(off)
        values = _bf16_to_f32(np.frombuffer(f.read(nbytes), dtype="<u2"))
        new = _f32_to_bf16(np.asarray(fn(values), np.float32))
        assert new.nbytes == nbytes
        f.seek(off)
        f.write(new.astype("<u2").tobytes())


@pytest.fixture(scope="module")
def mlx_clean(out_dir):
    pytest.importorskip("mlx")
    pytest.importorskip("mlx_lm")
    r = api.export("mlx", VARIANT, "bf16", out_dir / "mlx", force=True)
    assert r.path.is_dir()
    return r.path


def test_mlx_clean_control_passes(mlx_clean, reference):
    """The unmodified bf16 directory passes (mlx-lm computes in bf16, so it is held to the bf16 preset's limits)."""
    _assert_clean(_validate(mlx_clean, reference))


def test_mlx_final_norm_one_plus_w_fails(mlx_clean, reference, tmp_path):
    """language_model.model.norm.weight stored as 1 + w (the Gemma 1-3 norm convention carried over to Gemma 4).
    Caught by mean KLD and the PPL ratio (top-1 agreement only just: mlx-lm's bf16 compute earns the bf16 preset
    loose limits)."""
    d = _copy(mlx_clean, tmp_path / mlx_clean.name)
    mlx_edit_tensor(d, "language_model.model.norm.weight", lambda w: 1.0 + w)
    rep = _validate(d, reference)
    _assert_caught(rep, "mean KLD", "PPL ratio")


def test_mlx_gate_up_swapped_fails(mlx_clean, reference, tmp_path):
    """One layer's mlp.gate_proj and mlp.up_proj exchanged in the shard (halves of a fused gate_up split the wrong
    way round). Caught by mean KLD, top-1 agreement and the greedy generations."""
    d = _copy(mlx_clean, tmp_path / mlx_clean.name)
    stem = f"language_model.model.layers.{FFN_LAYER}.mlp."
    ga, ua = _mlx_tensor(d, stem + "gate_proj.weight"), _mlx_tensor(d, stem + "up_proj.weight")
    assert ga[0] == ua[0] and ga[2:] == ua[2:]
    with open(ga[0], "r+b") as f:
        f.seek(ga[1])
        g = f.read(ga[2])
        f.seek(ua[1])
        u = f.read(ua[2])
        assert g != u
        f.seek(ga[1])
        f.write(u)
        f.seek(ua[1])
        f.write(g)
    rep = _validate(d, reference)
    _assert_caught(rep, "mean KLD", "top-1", "greedy")


# ---- ONNX: edits of the decoder's external data and of its graph ---------------------------------------------


def _decoder_path(directory: Path) -> Path:
    from gemma4_export.targets.onnx import graph_files

    return directory / graph_files("fp32")["decoder_model_merged"]


def _onnx_model(directory: Path):
    import onnx

    return onnx.load(str(_decoder_path(directory)), load_external_data=False)


def _external(model, name: str) -> tuple[str, int, int]:
    """(location, offset, length) of an initializer held in the external data file."""
    from onnx import TensorProto

    t = next(i for i in model.graph.initializer if i.name == name)
    assert t.data_location == TensorProto.EXTERNAL and t.data_type == TensorProto.FLOAT, name
    d = {e.key: e.value for e in t.external_data}
    return d["location"], int(d.get("offset", 0)), int(d["length"])


def onnx_swap_external(directory: Path, a: str, b: str) -> None:
    m = _onnx_model(directory)
    (la, oa, na), (lb, ob, nb) = _external(m, a), _external(m, b)
    assert la == lb and na == nb
    with open(_decoder_path(directory).parent / la, "r+b") as f:
        f.seek(oa)
        da = f.read(na)
        f.seek(ob)
        db = f.read(nb)
        assert da != db
        f.seek(oa)
        f.write(db)
        f.seek(ob)
        f.write(da)


def onnx_replace_constant(directory: Path, node_pattern: str, input_index: int, fn, expect: int = 1) -> None:
    """Give the nodes whose name matches `node_pattern` (the graph names a node after its first output,
    "<hint>/<n>") a new graph constant fn(old) at `input_index`. A new initializer, not an edit of the old one:
    identical constants are shared, so editing in place could change other nodes too."""
    import onnx
    from onnx import numpy_helper

    m = _onnx_model(directory)
    inits = {i.name: i for i in m.graph.initializer}
    nodes = [n for n in m.graph.node if re.fullmatch(node_pattern, n.name)]
    assert len(nodes) == expect, f"{node_pattern}: {[n.name for n in nodes]}"
    olds = {n.input[input_index] for n in nodes}
    assert len(olds) == 1, olds
    old = numpy_helper.to_array(inits[olds.pop()])
    new = numpy_helper.from_array(np.asarray(fn(old), dtype=old.dtype), "negative_control/" + node_pattern)
    m.graph.initializer.append(new)
    for n in nodes:
        n.input[input_index] = new.name
    onnx.save(m, str(_decoder_path(directory)))


@pytest.fixture(scope="module")
def onnx_clean(out_dir):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    r = api.export("onnx", VARIANT, "fp32", out_dir / "onnx", force=True)
    assert r.path.is_dir()
    return r.path


def test_onnx_clean_control_passes(onnx_clean, reference):
    """The unmodified fp32 graph passes, to float rounding."""
    rep = _validate(onnx_clean, reference)
    _assert_clean(rep)
    assert rep.logits.max_logit_diff < 5e-3 and rep.logits.top1_agreement == 1.0


def test_onnx_gate_up_swapped_fails(onnx_clean, reference, tmp_path):
    """One layer's mlp.gate_proj and mlp.up_proj bytes exchanged in the decoder's data: gelu(up) * gate. Caught by
    mean KLD and max |logit difference|."""
    d = _copy(onnx_clean, tmp_path / onnx_clean.name)
    stem = f"model.language_model.layers.{FFN_LAYER}.mlp."
    onnx_swap_external(d, stem + "gate_proj.weight", stem + "up_proj.weight")
    rep = _validate(d, reference)
    _assert_caught(rep, "mean KLD", "max |logit difference|")


def test_onnx_input_norm_one_plus_w_fails(onnx_clean, reference, tmp_path):
    """Layer 0's input_layernorm weight applied as 1 + w (a graph constant: x * (1 + w), the Gemma 1-3 form), in
    one layer only. Subtle (mean KLD ~8e-5), but the fp32 graph is held to float rounding: caught by mean KLD,
    max |logit difference| and top-1 agreement."""
    d = _copy(onnx_clean, tmp_path / onnx_clean.name)
    hint = re.escape("model.language_model.layers.0.input_layernorm")
    onnx_replace_constant(d, hint + r"/\d+", 1, lambda w: 1.0 + w)
    rep = _validate(d, reference)
    _assert_caught(rep, "mean KLD", "max |logit difference|", "top-1")


def test_onnx_wrong_final_softcap_fails(onnx_clean, reference, tmp_path):
    """The final softcap constant (tanh(x / c) * c) set to 50 instead of 30 (Gemma 2's attention softcap). Caught
    by mean KLD and max |logit difference|."""
    d = _copy(onnx_clean, tmp_path / onnx_clean.name)

    def wrong(c):
        assert c.item() == pytest.approx(FINAL_SOFTCAP)
        return np.full_like(c, WRONG_SOFTCAP)

    onnx_replace_constant(d, r"softcap(\.div)?/\d+", 1, wrong, expect=2)
    rep = _validate(d, reference)
    _assert_caught(rep, "mean KLD", "max |logit difference|")


def test_onnx_partial_rotary_dropped_fails(onnx_clean, reference, tmp_path):
    """The full-attention layers' RoPE inverse frequencies (a graph constant) computed as default RoPE over the whole
    head, ignoring partial_rotary_factor: the pairs that proportional RoPE leaves unrotated (frequency 0) rotate.
    The graph's analogue of GGUF's dropped rope_freqs. Caught by mean KLD, max |logit difference| and top-1."""
    d = _copy(onnx_clean, tmp_path / onnx_clean.name)
    theta = get_variant(VARIANT).arch().rope_full.theta

    def full_rotation(inv):
        assert (inv == 0).any()  # proportional RoPE: some pairs do not rotate
        hd = 2 * inv.shape[-1]
        return (1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)).astype(np.float32).reshape(inv.shape)

    onnx_replace_constant(d, re.escape("rope.full_attention.freqs") + r"/\d+", 1, full_rotation)
    rep = _validate(d, reference)
    _assert_caught(rep, "mean KLD", "max |logit difference|", "top-1")
