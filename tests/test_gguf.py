"""GGUF export through llama.cpp's quantizer, checked against the plan and validated in llama.cpp itself."""

import errno
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma4_export.atomic import OutputError
from gemma4_export.errors import Gemma4ExportError, QuantError
from gemma4_export.exporter.variants import TINY, get_variant
from gemma4_export import api
from gemma4_export.targets.gguf import gguf_name
from gemma4_export.targets.gguf_file import GGUFFormatError, GGUFWriter, read_gguf
from gemma4_export.validate.harness import validate_artifact

pytest.importorskip("llama_cpp")

PRESETS = ["f32", "bf16", "q8_0", "q4_k_m"]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def references():
    """One fp32 reference per tiny variant, shared by the validations of its presets."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = api.reference(name)
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("variant", TINY)
def test_export_matches_plan_and_validates(variant, preset, out_dir, references):
    r = api.export("gguf", variant, preset, out=out_dir, force=True)
    assert r.path == out_dir / f"{variant}-{preset}.gguf" and r.path.is_file()
    g = read_gguf(r.path)
    # every planned tensor is in the file with the planned type, and nothing else is
    want = {gguf_name(e.name, "model.language_model."): e.type for e in r.plan.kept}
    got = {n: t.type for n, t in g.tensors.items() if n != "rope_freqs.weight"}
    assert got == want
    assert not [n for n in g.tensors if "vision" in n or "audio" in n]
    # metadata written from the config, never left to llama.cpp's defaults
    m = g.metadata
    a = get_variant(variant).arch()
    assert m["general.architecture"] == "gemma4" and m["gemma4_export.preset"] == preset
    assert m["gemma4.final_logit_softcapping"] == pytest.approx(30.0)
    assert m["gemma4.attention.sliding_window_pattern"] == list(a.sliding_pattern)
    assert m["gemma4.attention.key_length"] == a.global_head_dim and m["gemma4.attention.key_length_swa"] == a.head_dim
    assert m["gemma4.attention.shared_kv_layers"] == a.num_kv_shared_layers
    assert m["gemma4.embedding_length_per_layer_input"] == a.ple_dim
    assert m["tokenizer.ggml.model"] == "gemma4" and m["tokenizer.ggml.add_bos_token"] is True
    assert "<|turn>" in m["tokenizer.chat_template"]

    rep = validate_artifact(r.path, variant, reference=references(variant))
    assert rep.tokenizer["mismatches"] == []
    assert rep.passed, rep.failures
    if preset == "f32":
        assert rep.logits.max_logit_diff < 2e-2 and rep.logits.kld_mean < 1e-6 and rep.logits.top1_agreement == 1.0
        assert rep.generation.exact_match_rate == 1.0
    assert (out_dir / f"{variant}-{preset}.gguf.validation.json").is_file()


def test_k_eq_v_and_moe_layout(out_dir):
    g = read_gguf(api.export("gguf", "tiny-26b-a4b", "bf16", out=out_dir, force=True).path)
    t = g.tensors
    assert "blk.5.attn_v.weight" not in t and "blk.0.attn_v.weight" in t  # K==V on the full layer
    assert t["blk.0.ffn_gate_up_exps.weight"].shape == (4, 512, 256)
    assert t["blk.0.ffn_down_exps.weight"].shape == (4, 256, 256)
    assert t["blk.0.ffn_gate_inp.weight"].type == "F32"
    assert t["blk.0.ffn_gate_inp.scale"].shape == (256,) and t["blk.0.ffn_down_exps.scale"].shape == (4,)
    assert g.metadata["gemma4.expert_count"] == 4 and g.metadata["gemma4.expert_used_count"] == 2
    assert g.metadata["gemma4.attention.head_count_kv"] == [2, 2, 2, 2, 2, 1]


def test_kv_shared_layers_drop_their_unused_weights(out_dir):
    g = read_gguf(api.export("gguf", "tiny-e2b", "f32", out=out_dir, force=True).path)
    assert "blk.4.attn_k.weight" in g.tensors and "blk.5.attn_k.weight" not in g.tensors
    assert "blk.5.attn_q.weight" in g.tensors
    assert g.metadata["gemma4.feed_forward_length"] == [256] * 5 + [512] * 5  # double-wide on shared layers
    assert g.tensors["per_layer_token_embd.weight"].shape == (1024, 2560)


def test_existing_artifact_is_kept(out_dir):
    p = api.export("gguf", "tiny-31b", "f16", out=out_dir, force=True).path
    before = p.stat().st_mtime_ns
    with pytest.raises(OutputError, match="exists; pass --force"):
        api.export("gguf", "tiny-31b", "f16", out=out_dir)
    assert p.stat().st_mtime_ns == before


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    from gemma4_export.exporter import checkpoint

    real = checkpoint.Checkpoint.iter_rows
    calls = {"n": 0}

    def flaky(self, name, max_bytes=64 << 20):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        yield from real(self, name, max_bytes)

    monkeypatch.setattr(checkpoint.Checkpoint, "iter_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        api.export("gguf", "tiny-e2b", "q4_k_m", out=tmp_path)
    assert list(tmp_path.iterdir()) == []


def _slow_export(out: Path, cli: bool) -> subprocess.Popen:
    """A tiny-e2b bf16 export in a process of its own, slowed to 50 ms per block of rows read, through the library
    or through the console script's main()."""
    call = (f"import sys; sys.argv = ['gemma4-export', 'gguf', '--variant', 'tiny-e2b', '--quant', 'bf16', "
            f"'--no-validate', '--out', {str(out)!r}]\nfrom gemma4_export import cli\ncli.main()\n" if cli else
            f"from gemma4_export import api\napi.export('gguf', 'tiny-e2b', 'bf16', out={str(out)!r})\n")
    code = (
        "import time\n"
        "from gemma4_export.exporter import checkpoint\n"
        "real = checkpoint.Checkpoint.iter_rows\n"
        "def slow(self, name, max_bytes=64 << 20):\n"
        "    for x in real(self, name, max_bytes):\n"
        "        time.sleep(0.05)\n"
        "        yield x\n"
        "checkpoint.Checkpoint.iter_rows = slow\n" + call
    )
    # as from a terminal: a test run under nohup would hand the child an ignored SIGHUP, which the CLI keeps ignored
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)])
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob(".*partial")) and p.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    return p


def test_killed_export_never_leaves_the_final_name(tmp_path):
    """SIGKILL in the middle of an export: the final name never appears (only a hidden partial file can), and the
    next export to that name removes the partial file the killed process left."""
    p = _slow_export(tmp_path, cli=False)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    left = list(tmp_path.glob(".*partial"))
    assert left and left[0].name == f".tiny-e2b-bf16.gguf.{p.pid}.partial", "caught mid-write"
    assert not (tmp_path / "tiny-e2b-bf16.gguf").exists()
    api.export("gguf", "tiny-e2b", "bf16", out=tmp_path)
    assert (tmp_path / "tiny-e2b-bf16.gguf").is_file()
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminated_export_removes_its_staging(tmp_path, sig):
    """SIGTERM (kill, a CI timeout) and SIGHUP (the terminal closed) stop the command as Ctrl-C does: its staging
    file is removed, nothing is under the final name, one line says why, and it exits 128 + the signal."""
    p = _slow_export(tmp_path, cli=True)
    assert any(tmp_path.glob(".*partial")), "caught mid-write"
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, stderr
    assert f"stopped by {sig.name}; nothing was written under the final name" in stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_is_cleared(tmp_path):
    """What a dead process left beside a final name goes; a live process's, another name's and a moved-aside
    artifact whose final name is still there stay; an artifact moved aside with nothing under the final name is put
    back (the process died between atomic_dir's two renames)."""
    from gemma4_export.atomic import clear_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "m-4bit"
    (tmp_path / f".m-4bit.{dead.pid}.partial").mkdir()
    (tmp_path / f".m-4bit.{dead.pid}.partial" / "weights.safetensors").write_bytes(b"x")
    (tmp_path / f".m-4bit.{dead.pid}.old").mkdir()
    (tmp_path / f".m-4bit.{dead.pid}.old" / "config.json").write_text("{}")
    keep = [f".m-4bit.{os.getpid()}.partial", f".m-4bit.{os.getppid()}.partial", f".m-8bit.{dead.pid}.partial",
            f".m-4bit.{dead.pid}.other", "m-4bit.json"]
    for n in keep:
        (tmp_path / n).write_bytes(b"")
    done = clear_stale(final)
    assert sorted(q.name for q in done) == [f".m-4bit.{dead.pid}.old", f".m-4bit.{dead.pid}.partial"]
    assert (final / "config.json").read_text() == "{}"
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(keep + ["m-4bit"])

    (tmp_path / f".m-4bit.{dead.pid}.old").mkdir()  # the final name is there: an old copy is only litter
    assert [q.name for q in clear_stale(final)] == [f".m-4bit.{dead.pid}.old"]
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(keep + ["m-4bit"])


def test_disk_full_is_reported(tmp_path, monkeypatch):
    from gemma4_export import atomic

    monkeypatch.setattr(atomic, "free_bytes", lambda d: 1000)
    with pytest.raises(OutputError, match="not enough disk space"):
        api.export("gguf", "tiny-31b", "q8_0", out=tmp_path)

    monkeypatch.undo()

    def enospc(self, f, blocks_for):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write", enospc)
    with pytest.raises(OutputError, match="disk full"):
        api.export("gguf", "tiny-31b", "bf16", out=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_impossible_quant_choice(tmp_path):
    with pytest.raises(QuantError):
        api.export("gguf", "tiny-e2b", "q3_k_xl", out=tmp_path)
    with pytest.raises(QuantError, match="matched no kept tensor"):
        api.export("gguf", "tiny-e2b", "q8_0", out=tmp_path, overrides=["nothing_like_this=Q8_0"])
    assert list(tmp_path.iterdir()) == []


# ---- malformed GGUF files --------------------------------------------------------------------------------------


def _header(n_tensors, n_kv, body=b""):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04" + b"\0" * 40, "not a GGUF file"),
        (_header(1 << 40, 1 << 40), "header claims"),
        (_header(0, 1, struct.pack("<Q", 1 << 50) + b"key"), "needs"),
        # one key whose array claims 2^60 int32 elements
        (_header(0, 1, struct.pack("<Q", 3) + b"abc" + struct.pack("<IIQ", 9, 5, 1 << 60)), "elements of 'abc'"),
        (_header(0, 1, struct.pack("<Q", 3) + b"abc" + struct.pack("<IIQ", 9, 8, 1 << 60)), "strings of 'abc'"),
        (_header(0, 1, struct.pack("<Q", 3) + b"abc" + struct.pack("<I", 99) + b"\0" * 16), "unknown value type"),
    ],
)
def test_malformed_gguf_gets_a_clear_error(tmp_path, data, message):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data + b"\0" * 64)
    t0 = time.time()
    with pytest.raises(GGUFFormatError, match=message):
        read_gguf(p)
    assert time.time() - t0 < 5
    with pytest.raises(Gemma4ExportError):
        validate_artifact(p, "tiny-e2b", write=False)


def test_tensor_outside_file(tmp_path):
    w = GGUFWriter()
    w.string("general.architecture", "gemma4")
    w.add_tensor("x.weight", (4, 32), "F32")
    p = tmp_path / "short.gguf"
    p.write_bytes(w.header_bytes() + b"\0" * 16)
    with pytest.raises(GGUFFormatError, match="outside the file"):
        read_gguf(p)


def test_non_gemma_gguf(tmp_path):
    w = GGUFWriter()
    w.string("general.architecture", "llama")
    p = tmp_path / "llama.gguf"
    with open(p, "wb") as f:
        w.write(f, lambda e: [])
    with pytest.raises(Gemma4ExportError, match="architecture 'llama', not a Gemma 4 model"):
        validate_artifact(p, "tiny-e2b", write=False)


@pytest.mark.slow
def test_cli_main_job(tmp_path):
    env = dict(os.environ, COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "gemma4_export.cli", "gguf", "--variant", "tiny-31b", "--quant", "q4_k_m",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PASS" in r.stdout and (tmp_path / "tiny-31b-q4_k_m.gguf").is_file()
    assert (tmp_path / "tiny-31b-q4_k_m.gguf.validation.md").is_file()
