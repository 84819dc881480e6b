"""Calibration: the importance statistics, llama.cpp's imatrix file, and the one-pass GGUF quantizer that uses them.

The statistics are checked against the whole transformers model run with its own forward; the quantizer's bytes
against llama.cpp's own `llama_model_quantize` given the same types and the same imatrix vectors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gemma4_export import api
from gemma4_export.errors import Gemma4ExportError, QuantError
from gemma4_export.progress import Silent
from gemma4_export.quant import calibrate as cal
from gemma4_export.quant.rules import get_preset
from gemma4_export.targets import gguf as G
from gemma4_export.targets.gguf_file import read_gguf

pytest.importorskip("llama_cpp")


def _src(v):
    return api.open_source(v, need_weights=True)


@pytest.fixture(scope="module")
def calib_e2b():
    src = _src("tiny-e2b")
    return src, cal.calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=256, chunks=3)


def test_calibration_set_mixes_code_prose_and_chat():
    import transformers

    src = _src("tiny-e2b")
    tok = transformers.AutoTokenizer.from_pretrained(src.checkpoint.dir)
    text = cal.shipped_text(tok)
    head = text[: len(text) // 8]  # any prefix mixes all three kinds
    assert "# file:" in head and "<|turn>user" in head and "def " in head
    assert any(ord(ch) > 0x3000 for ch in text)  # prose beyond Latin scripts
    heldout_files = {"abc.py", "bz2.py", "lzma.py", "graphlib.py", "timeit.py", "stat.py", "token.py",
                     "nturl2path.py", "this.py", "wave.py"}
    names = {line.split("# file:")[1].strip() for line in text.splitlines() if line.startswith("# file:")}
    assert names and not names & heldout_files  # disjoint from the evaluation text
    c = cal.calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunks=cal.DEFAULT_CHUNKS)
    assert len(c.chunks) == cal.DEFAULT_CHUNKS and all(len(x) == cal.DEFAULT_CHUNK for x in c.chunks)
    assert all(x[0] == src.arch.bos_token_id for x in c.chunks)


def test_a_tokenizer_without_a_chat_template_calibrates_on_plain_chat_text(tmp_path):
    """A tokenizer saved without a chat template (a base model's, a raw-text fine-tune's) gets the chat turns as
    their plain text; it used to stop the export in transformers' apply_chat_template."""
    import transformers

    from gemma4_export.exporter.variants import get_variant
    from layouts import without_chat_template

    d = without_chat_template("tiny-31b", tmp_path / "ck")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert not tok.chat_template
    text = cal.shipped_text(tok)
    first = json.loads((cal.CALIBRATION_DIR / "chat.json").read_text())[0]
    assert "\n\n".join(m["content"] for m in first) in text and "<|turn>" not in text
    with_template = cal.shipped_text(transformers.AutoTokenizer.from_pretrained(get_variant("tiny-31b").local_dir))
    assert "<|turn>user" in with_template and with_template != text
    c = cal.calibration_set(d, 2, chunk=128, chunks=2)
    other = cal.calibration_set(get_variant("tiny-31b").local_dir, 2, chunk=128, chunks=2)
    assert len(c.chunks) == 2 and c.text_sha256 != other.text_sha256  # its own cache entry


def test_statistics_equal_the_whole_models_own_activations(calib_e2b):
    """Every dense matrix's sums of squared inputs, from the streamed model's hooks, against the whole
    transformers model's forward with hooks on its own Linear modules."""
    import torch
    import transformers

    src, calib = calib_e2b
    imp = cal.collect(src, calib)
    model = transformers.AutoModelForCausalLM.from_pretrained(src.checkpoint.dir, dtype=torch.float32)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ("layers." in name or "per_layer_model_projection" in name) \
                and "vision" not in name and "audio" not in name:
            def hook(m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.square().sum(0)
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in calib.chunks:
            model(torch.tensor([ids]))
    prefix = src.checkpoint.text_prefix
    checked = 0
    for name, s in sums.items():
        hf = name.split("language_model.", 1)[-1]
        gname = G.gguf_name(prefix + hf + ".weight", prefix)
        assert gname in imp, gname
        np.testing.assert_allclose(imp.sums[gname][0], s.float().numpy(), rtol=2e-4, atol=1e-6)
        assert imp.counts[gname][0] == sum(len(c) for c in calib.chunks)
        checked += 1
    assert checked >= 7 * src.arch.num_layers - 2 * src.arch.num_kv_shared_layers
    # the head: the final normed hidden states of every token
    head = "token_embd.weight"
    assert imp.counts[head][0] == sum(len(c) for c in calib.chunks) and (imp.sums[head] > 0).all()
    assert imp.token_counts.sum() == sum(len(c) for c in calib.chunks)


def test_experts_count_the_tokens_routed_to_them():
    src = _src("tiny-26b-a4b")
    calib = cal.calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=128, chunks=2)
    imp = cal.collect(src, calib)
    tokens = sum(len(c) for c in calib.chunks)
    for i in range(src.arch.num_layers):
        for part in ("ffn_gate_up_exps", "ffn_down_exps"):
            name = f"blk.{i}.{part}.weight"
            assert imp.sums[name].shape[0] == src.arch.moe.num_experts
            assert imp.counts[name].sum() == tokens * src.arch.moe.top_k  # each token reaches top_k experts
        np.testing.assert_array_equal(imp.counts[f"blk.{i}.ffn_gate_up_exps.weight"],
                                      imp.counts[f"blk.{i}.ffn_down_exps.weight"])
        assert imp.counts[f"blk.{i}.ffn_gate_inp.weight"][0] == tokens


def test_imatrix_file_round_trips_in_llama_cpps_format(tmp_path, calib_e2b):
    from gguf import GGUFReader

    src, calib = calib_e2b
    imp = cal.collect(src, calib)
    path = cal.write_imatrix(imp, tmp_path / "x.imatrix.gguf")
    r = GGUFReader(path)  # gguf-py, llama.cpp's own reader for Python
    fields = {k: r.fields[k] for k in r.fields}
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(fields["imatrix.chunk_count"].parts[-1][0]) == len(calib.chunks)
    assert int(fields["imatrix.chunk_size"].parts[-1][0]) == calib.chunk_size
    tensors = {t.name: t for t in r.tensors}
    t = tensors["blk.0.attn_q.weight.in_sum2"]
    assert t.tensor_type.name == "F32" and list(t.shape) == [src.arch.hidden_size, 1]
    assert list(tensors["blk.0.attn_q.weight.counts"].shape) == [1, 1]
    back = cal.read_imatrix(path)
    assert set(back.sums) == set(imp.sums)
    for k in imp.sums:
        np.testing.assert_array_equal(back.weights(k), imp.weights(k))


def test_bad_imatrix_files_are_refused(tmp_path, calib_e2b):
    src, calib = calib_e2b
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 4)
    with pytest.raises(cal.CalibrationError, match="not a GGUF imatrix"):
        cal.read_imatrix(tmp_path / "junk.gguf")
    model = api.export("gguf", "tiny-31b", "f16", tmp_path)
    with pytest.raises(cal.CalibrationError, match="not an imatrix"):
        cal.read_imatrix(model.path)
    other = cal.collect(_src("tiny-26b-a4b"), cal.calibration_set(
        _src("tiny-26b-a4b").checkpoint.dir, 2, chunk=64, chunks=1))
    other_file = cal.write_imatrix(other, tmp_path / "26b.imatrix.gguf")
    with pytest.raises(cal.CalibrationError, match="another model"):
        api.export("gguf", "tiny-e2b", "q4_k_m", tmp_path, imatrix=other_file)
    assert not (tmp_path / "tiny-e2b-q4_k_m.gguf").exists()


def test_calibration_choices_are_checked(tmp_path):
    with pytest.raises(QuantError, match="only made with calibration"):
        api.export("gguf", "tiny-e2b", "q2_k", tmp_path, calibrate=False)
    with pytest.raises(QuantError, match="choose one"):
        api.export("gguf", "tiny-e2b", "q4_k_m", tmp_path, calibrate=False, calibration=tmp_path / "x.txt")
    short = tmp_path / "short.txt"
    short.write_text("def f():\n    return 1\n")
    with pytest.raises(cal.CalibrationError, match="one chunk needs"):
        api.export("gguf", "tiny-e2b", "q4_k_m", tmp_path, calibration=short)
    with pytest.raises(cal.CalibrationError, match="no such file"):
        api.export("gguf", "tiny-e2b", "q4_k_m", tmp_path, calibration=tmp_path / "missing.txt")
    assert not list(tmp_path.glob("*.gguf"))


def test_calibration_is_on_below_8_bits_and_cached(tmp_path):
    q8 = api.export("gguf", "tiny-31b", "q8_0", tmp_path)
    assert q8.plan.calibration is None and "calibrate" not in q8.seconds
    r1 = api.export("gguf", "tiny-31b", "q4_k_m", tmp_path, calibration_chunks=2)
    assert r1.plan.calibration["chunks"] == 2 and r1.plan.calibration["entries"] > 0
    meta = read_gguf(r1.path).metadata
    assert meta["quantize.imatrix.chunks_count"] == 2
    assert meta["quantize.imatrix.entries_count"] == r1.plan.calibration["entries"]
    assert json.loads(Path(r1.plan_file).read_text())["calibration"]["chunks"] == 2
    r2 = api.export("gguf", "tiny-31b", "q4_k_m", tmp_path / "again", calibration_chunks=2)
    assert r2.plan.calibration.get("cached") is True  # the second export read the cached imatrix
    assert r2.path.read_bytes() == r1.path.read_bytes()
    plain = api.export("gguf", "tiny-31b", "q4_k_m", tmp_path / "plain", calibrate=False)
    assert plain.plan.calibration is None and plain.path.read_bytes() != r1.path.read_bytes()


# ---- the one-pass quantizer against llama.cpp's ------------------------------------------------------------------


def _tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    g = read_gguf(path, arrays=False)
    out = {}
    with open(path, "rb") as f:
        for n, t in g.tensors.items():
            f.seek(t.offset)
            out[n] = (t.type, f.read(t.nbytes))
    return out


@pytest.mark.parametrize("variant,preset,calibrated", [
    ("tiny-e2b", "q4_k_m", False), ("tiny-e2b", "q4_k_m", True), ("tiny-26b-a4b", "q3_k_m", True),
    ("tiny-31b", "iq4_xs", True), ("tiny-12b", "q2_k", True), ("tiny-26b-a4b", "q4_0", False),
])
def test_one_pass_bytes_equal_llama_model_quantize(tmp_path, variant, preset, calibrated):
    """The one-pass export, and llama.cpp's own quantizer run over a float GGUF of the same checkpoint with the
    same per-tensor types and the same imatrix vectors, write the same bytes for every tensor."""
    kw = {"calibration_chunks": 2, "gptq": False} if calibrated else {"calibrate": False}
    r = api.export("gguf", variant, preset, tmp_path, **kw)
    imp = None
    if calibrated:
        src = _src(variant)
        imp = cal.importance_for(src, chunks=2)
    src = _src(variant)
    p = get_preset(preset, "gguf")
    staged = tmp_path / "staged.gguf"
    names = G.convert(src.checkpoint, src, r.plan, p, staged, True, Silent())
    ref = tmp_path / "llama.gguf"
    G.llama_quantize(staged, ref, r.plan, p, names, Silent(), importance=imp)
    ours, theirs = _tensor_bytes(r.path), _tensor_bytes(ref)
    assert set(ours) == set(theirs)
    differ = [n for n in ours if ours[n] != theirs[n]]
    assert not differ, differ[:5]
    assert any(t not in G.FLOAT_TYPES for t, _ in ours.values())


def test_row_blocks_and_their_pipeline_do_not_change_the_bytes(tmp_path):
    """Quantizing in small row blocks (so that every tensor takes many, pipelined reads and quantizations, and an
    expert's rows end inside a block) writes the same bytes as whole tensors at once: the blocks, the ring of reused
    buffers, the per-expert imatrix vectors and the per-expert Hessians line up."""
    src = _src("tiny-26b-a4b")
    imp = cal.importance_for(src, chunks=2, hessians=True)  # GPTQ's feedback too: rows are independent in it
    r = api.export("gguf", "tiny-26b-a4b", "q4_k_m", tmp_path / "one", calibration_chunks=2, force=True)
    p = get_preset("q4_k_m", "gguf")
    out = {}
    for label, block in (("small", 40_000), ("whole", 1 << 30)):
        path = tmp_path / f"{label}.gguf"
        G.convert(src.checkpoint, src, r.plan, p, path, False, Silent(), block_bytes=block, importance=imp)
        out[label] = _tensor_bytes(path)
    experts = [n for n in out["small"] if "_exps" in n]
    assert experts and out["small"] == out["whole"] == _tensor_bytes(r.path)


def _llama_tool(name: str) -> str | None:
    d = os.environ.get("GEMMA4_LLAMA_TOOLS")
    return shutil.which(name, path=d) if d else None


@pytest.mark.skipif(_llama_tool("llama-quantize") is None,
                    reason="set GEMMA4_LLAMA_TOOLS to a directory with llama.cpp's llama-quantize (built from the "
                           "llama.cpp tree in llama-cpp-python's source distribution) to run this check")
def test_llama_quantize_tool_reads_our_imatrix_file(tmp_path):
    """llama.cpp's own `llama-quantize --imatrix` with our imatrix file quantizes exactly as our export does without
    GPTQ's feedback (which the file cannot carry)."""
    r = api.export("gguf", "tiny-31b", "q4_k_m", tmp_path, calibration_chunks=2, gptq=False)
    src = _src("tiny-31b")
    imp = cal.importance_for(src, chunks=2)
    imat = cal.write_imatrix(imp, tmp_path / "tiny-31b.imatrix.gguf")
    staged = tmp_path / "staged.gguf"
    p = get_preset("q4_k_m", "gguf")
    names = G.convert(src.checkpoint, src, r.plan, p, staged, True, Silent())
    types = tmp_path / "types.txt"
    types.write_text("\n".join(f"^{n.replace('.', '[.]')}$={t.lower()}" for n, t in names.items()
                               if t not in G.FLOAT_TYPES))
    out = tmp_path / "tool.gguf"
    subprocess.run([_llama_tool("llama-quantize"), "--imatrix", str(imat), "--tensor-type-file", str(types),
                    str(staged), str(out), "Q4_K_M"], check=True, capture_output=True)
    ours, theirs = _tensor_bytes(r.path), _tensor_bytes(out)
    assert {n: v for n, v in ours.items()} == {n: theirs[n] for n in ours}


def test_quantizer_refuses_a_type_that_needs_an_imatrix():
    from gemma4_export.targets.ggml_quant import GGMLError, Quantizer, requires_imatrix

    assert requires_imatrix("IQ2_XXS") and not requires_imatrix("Q4_K")
    with Quantizer(1) as q, pytest.raises(GGMLError, match="needs importance weights"):
        q.quantize("IQ2_XXS", np.ones((2, 256), np.float32))
    with Quantizer(2) as q:  # threads split rows; the bytes do not depend on how
        rows = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
        imat = np.random.default_rng(1).random(256).astype(np.float32)
        with Quantizer(1) as q1:
            assert q.quantize("Q4_K", rows, imat).tobytes() == q1.quantize("Q4_K", rows, imat).tobytes()
        with pytest.raises(Gemma4ExportError, match="importance vector"):
            q.quantize("Q4_K", rows, imat[:128])
