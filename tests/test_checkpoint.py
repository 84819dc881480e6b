"""The lazy reader on every tiny checkpoint, the Hugging Face cache, and every kind of bad input."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gemma4_export.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from gemma4_export.exporter.checkpoint import Checkpoint, f32_row_blocks, prefetched, resolve_checkpoint, to_f32
from gemma4_export.exporter.tensors import Role
from gemma4_export.exporter.variants import get_variant


def test_reads_every_tensor_exactly(tiny):
    """Every tensor, read lazily, equals what the safetensors library itself loads, bit for bit."""
    d = get_variant(tiny).local_dir
    with Checkpoint(d) as ck:
        assert ck.text_prefix == "model.language_model."
        for f in ck.files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    want = st.get_tensor(name)
                    got = ck.raw(name)
                    if want.dtype == torch.bfloat16:
                        assert np.array_equal(got, want.view(torch.uint16).numpy()), name
                    else:
                        assert np.array_equal(got, want.numpy()), name


def test_layout_matches_the_hub(tiny):
    d = get_variant(tiny).local_dir
    with Checkpoint(d) as ck:
        names = set(ck.tensors)
        assert not any("lm_head" in n for n in names), "tied embeddings: no lm_head in the file"
        assert ck.tower_tensors, "small towers are present, so text export must skip them for real"
        assert {i.dtype for i in ck.tensors.values()} == {"BF16"}
        a = ck.arch
        if a.num_kv_shared_layers:
            unused = [s for s in ck.expected if s.role == Role.KV_SHARED_UNUSED]
            assert len(unused) == 3 * a.num_kv_shared_layers and all(s.name in names for s in unused)
        # every quantizable row length is a multiple of 256, as on the real models
        from gemma4_export.exporter.tensors import MATRIX_ROLES

        for s in ck.expected:
            if s.role in MATRIX_ROLES:
                assert s.row_length % 256 == 0, s
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (d / f).is_file()


def test_one_checkpoint_is_sharded():
    d = get_variant("tiny-26b-a4b").local_dir
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    with Checkpoint(d) as ck:
        assert len(ck.files) == 2


def test_row_blocks_reassemble_the_tensor():
    d = get_variant("tiny-e2b").local_dir
    with Checkpoint(d) as ck:
        name = "model.language_model.embed_tokens_per_layer.weight"
        info = ck.info(name)
        blocks = list(ck.iter_rows(name, max_bytes=100_000))
        assert len(blocks) > 10 and all(b.nbytes <= max(100_000, info.shape[-1] * 2) for _, b in blocks)
        assert np.array_equal(np.concatenate([b for _, b in blocks]), ck.raw(name))
        f = to_f32(blocks[0][1], "BF16")
        assert f.dtype == np.float32 and np.isfinite(f).all()


@pytest.mark.parametrize("layout", [None, "fp16", "fp32-sharded"])  # bf16 (the shipped checkpoint), fp16, fp32
def test_float32_row_blocks_in_a_ring_of_buffers(layout, tmp_path):
    """The float32 blocks that the quantizer reads equal the tensor widened at once, block after block, although
    they live in reused buffers; prefetched in a thread they arrive the same."""
    from layouts import build

    d = build(layout, tmp_path / layout) if layout else get_variant("tiny-e2b").local_dir
    with Checkpoint(d) as ck:
        name = max((n for n in ck.tensors if "embed" in n), key=lambda n: ck.info(n).numel)
        info = ck.info(name)
        whole = to_f32(ck.raw(name), info.dtype).reshape(-1, info.shape[-1])
        for it in (f32_row_blocks(ck, name, 20_000, ring=3), prefetched(f32_row_blocks(ck, name, 20_000, ring=3))):
            got = [(r, b.copy()) for r, b in it]
            assert len(got) > 5 and got[0][0] == 0
            assert np.array_equal(np.concatenate([b for _, b in got]), whole)


def test_prefetched_hands_on_errors_and_stops_when_left():
    def items(log):
        for i in range(100):
            log.append(i)
            if i == 7:
                raise ValueError("bad block 7")
            yield i

    log: list[int] = []
    it = prefetched(items(log))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad block 7"):
        list(it)
    log2: list[int] = []
    it2 = prefetched(items(log2), depth=1)
    assert next(it2) == 0
    it2.close()  # the consumer stops: the producer must not run on through the tensor
    n = len(log2)
    assert n <= 3
    import time

    time.sleep(0.3)
    assert len(log2) == n


# ---- the Hugging Face cache -------------------------------------------------------------------------------------


def _fake_cache(tmp_path: Path, repo: str, src: Path) -> Path:
    """A hub-cache layout (models--org--name/snapshots/<rev>/ + refs/main) holding a copy of `src`."""
    root = tmp_path / "hub"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, snap)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    return root


def test_resolves_from_the_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    root = _fake_cache(tmp_path, "google/gemma-4-E2B", get_variant("tiny-e2b").local_dir)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    p = resolve_checkpoint(get_variant("e2b"))
    assert p.is_dir() and (p / "config.json").is_file() and "snapshots" in str(p)


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointNotFoundError, match=r"hf download google/gemma-4-31B.*tiny-\* variants"):
        resolve_checkpoint(get_variant("31b"))


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.fixture
def ckdir(tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(get_variant("tiny-31b").local_dir, d)
    return d


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such"):
        Checkpoint(tmp_path / "nope")


def test_no_config(ckdir):
    (ckdir / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        Checkpoint(ckdir)


def test_not_gemma4(ckdir):
    cfg = json.loads((ckdir / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (ckdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not a Gemma 4 checkpoint"):
        Checkpoint(ckdir)


def test_pickle_is_refused(ckdir):
    (ckdir / "model.safetensors").unlink()
    (ckdir / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never loads pickle"):
        Checkpoint(ckdir)


def test_truncated_file(ckdir):
    f = ckdir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor '.*' ends at"):
        Checkpoint(ckdir)


def test_garbage_header(ckdir):
    f = ckdir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint(ckdir)


def test_absurd_header_length(ckdir):
    f = ckdir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    with pytest.raises(CheckpointError, match="declares"):
        Checkpoint(ckdir)


def _rewrite(f: Path, mutate):
    """Rewrite a safetensors file's header through `mutate(header_dict)`, keeping the data."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])


@pytest.mark.parametrize("base_class", ["Gemma4Model", "Gemma4TextModel"])
def test_base_class_save_reads_as_the_head_class(ckdir, base_class):
    """transformers' base classes (what AutoModel builds) save without the head class's "model." prefix:
    Gemma4Model as language_model.* and vision_tower.*, Gemma4TextModel as layers.*, embed_tokens.* (text only).
    They read as the head class's checkpoint, every tensor under the head class's name with the same bytes."""
    with Checkpoint(get_variant("tiny-31b").local_dir) as hub:
        want = {n: hub.raw(n) for n in hub.tensors}
    cfg = json.loads((ckdir / "config.json").read_text())
    if base_class == "Gemma4TextModel":
        cfg = dict(cfg["text_config"], architectures=[base_class], model_type="gemma4_text")
        keep, head = "model.language_model.", "Gemma4ForCausalLM"
        want = {"model." + n[len(keep):]: a for n, a in want.items() if n.startswith(keep)}
    else:
        cfg["architectures"] = [base_class]
        keep, head = "model.", "Gemma4ForConditionalGeneration"
    (ckdir / "config.json").write_text(json.dumps(cfg))

    def strip(h):
        for n in [n for n in h if n != "__metadata__"]:
            meta = h.pop(n)
            if n.startswith(keep):
                h[n[len(keep):]] = meta
    _rewrite(ckdir / "model.safetensors", strip)
    raw = (ckdir / "model.safetensors").read_bytes()
    names = set(json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])) - {"__metadata__"}
    assert names and not any(n.startswith("model.") for n in names)
    with Checkpoint(ckdir) as ck:
        assert ck.base_layout and ck.arch.architecture == head
        assert set(ck.tensors) == set(want)
        assert all(ck.tensors[n].name == n for n in ck.tensors)
        for n, a in want.items():
            assert np.array_equal(ck.raw(n), a), n
        assert bool(ck.tower_tensors) == (base_class == "Gemma4Model")


@pytest.mark.parametrize("method", ["bitsandbytes", "fp8"])
def test_quantized_checkpoint_says_so(ckdir, method):
    """A checkpoint saved from a quantized model (a QLoRA run's 4-bit base, an FP8 release) stores its matrices as
    bytes or float8 with the quant method in config.json: refused with that reason, not a list of wrong shapes."""
    cfg = json.loads((ckdir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method}
    (ckdir / "config.json").write_text(json.dumps(cfg))
    name = "model.language_model.layers.0.mlp.up_proj.weight"

    def quantize(h):
        t = h[name]
        if method == "fp8":  # a dtype the reader does not take
            t["dtype"], t["data_offsets"][1] = "F8_E4M3", t["data_offsets"][0] + t["shape"][0] * t["shape"][1]
        else:  # bytes in a shape the config does not imply (bitsandbytes packs each matrix as a [n, 1] uint8)
            t["dtype"], t["shape"] = "U8", [t["shape"][0] * t["shape"][1] * 2, 1]
    _rewrite(ckdir / "model.safetensors", quantize)
    with pytest.raises(CheckpointError, match=rf"weights are quantized \({method}, .*merge_and_unload"):
        Checkpoint(ckdir)


def test_mlx_directory_says_so(ckdir):
    """An MLX directory (mlx-lm's names: language_model.model.*) given as the checkpoint is named for what it is."""
    def rename(h):
        for n in [n for n in h if n.startswith("model.language_model.")]:
            h["language_model.model." + n[len("model.language_model."):]] = h.pop(n)
    _rewrite(ckdir / "model.safetensors", rename)
    with pytest.raises(CheckpointError, match="an MLX directory"):
        Checkpoint(ckdir)


def test_missing_tensor_is_named(ckdir):
    name = "model.language_model.layers.2.mlp.up_proj.weight"
    _rewrite(ckdir / "model.safetensors", lambda h: h.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        Checkpoint(ckdir)


def test_wrong_shape_is_named(ckdir):
    name = "model.language_model.layers.5.self_attn.q_proj.weight"  # full layer: 4 heads x 128 = 512 rows

    def m(h):
        h[name]["shape"] = list(reversed(h[name]["shape"]))

    _rewrite(ckdir / "model.safetensors", m)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has shape \[256, 512\], "
                                              rf"the config implies \[512, 256\]"):
        Checkpoint(ckdir)


def test_overlapping_tensors(ckdir):
    a = "model.language_model.layers.0.input_layernorm.weight"
    b = "model.language_model.layers.0.post_attention_layernorm.weight"

    def m(h):
        h[b]["data_offsets"] = h[a]["data_offsets"]

    _rewrite(ckdir / "model.safetensors", m)
    with pytest.raises(CheckpointError, match="overlap"):
        Checkpoint(ckdir)


def test_index_names_a_missing_shard(tmp_path):
    d = tmp_path / "moe"
    shutil.copytree(get_variant("tiny-26b-a4b").local_dir, d)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard.*not present: model-00002-of-00002.safetensors"):
        Checkpoint(d)


def test_config_shape_mismatch_from_config_side(ckdir):
    cfg = json.loads((ckdir / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 768
    (ckdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        Checkpoint(ckdir)


def test_checkpoint_without_its_tokenizer_says_so(ckdir, tmp_path):
    """A fine-tune saved with model.save_pretrained alone has no tokenizer. Every export, the calibration and the
    reference stop on it with one message before any work (they failed deep in transformers' tokenizer loading, with
    a traceback about sentencepiece); the plan, which needs no tokenizer, still works."""
    from gemma4_export import api
    from gemma4_export.quant.calibrate import calibration_set

    for f in ckdir.iterdir():
        if f.name.startswith("tokenizer"):
            f.unlink()
    for target in ("gguf", "mlx", "onnx"):
        with pytest.raises(CheckpointError, match="no tokenizer.json.*tokenizer.save_pretrained"):
            api.export(target, model_dir=ckdir, out=tmp_path / target)
        assert not (tmp_path / target).exists() or not any((tmp_path / target).iterdir())
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        calibration_set(ckdir, 2)
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        api.reference(model_dir=ckdir)
    assert api.plan(model_dir=ckdir, preset="q4_k_m").entries
