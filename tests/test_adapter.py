"""PEFT LoRA adapters merged while streaming: against peft's own merge_and_unload, against the torch reference merge,
and every kind of adapter that must be refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from gemma4_export.errors import CheckpointError
from gemma4_export.exporter.adapter import AdaptedCheckpoint, Adapter, apply_to_torch_model
from gemma4_export.exporter.checkpoint import Checkpoint, to_f32
from gemma4_export.exporter.variants import get_variant

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4Model, Gemma4TextModel)

# peft's own advice (tied embeddings, save_embedding_layers, fan_in_fan_out) and transformers' deprecations
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TINY_31B = get_variant("tiny-31b").local_dir
TINY_E2B = get_variant("tiny-e2b").local_dir
TINY_MOE = get_variant("tiny-26b-a4b").local_dir
# Plain suffix lists (["q_proj", ...]) also hit the vision tower's Gemma4ClippableLinear, which peft cannot wrap, so
# multimodal adapters name the text decoder with a pattern.
TEXT_LINEARS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def _randomize(model, seed: int) -> None:
    """peft starts lora_B (lora_embedding_A) at zero, which would make every comparison vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _train(out: Path, base_dir: Path, cls=Gemma4ForConditionalGeneration, seed: int = 0, **lora) -> dict:
    """Save a random adapter for `base_dir` in `out`; return peft's merge_and_unload weights (float32)."""
    model = cls.from_pretrained(base_dir, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(**lora))
    _randomize(pm, seed)
    pm.save_pretrained(out)
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _streamed(ck, name: str) -> np.ndarray:
    """A merged tensor read through iter_rows in small, uneven blocks."""
    info = ck.info(name)
    row = info.shape[-1]
    blocks = list(ck.iter_rows(name, max_bytes=row * 4 * 5 + 3))  # 5 rows a block
    assert len(blocks) > 1 or info.numel // row <= 5
    assert [r for r, _ in blocks] == list(range(0, info.numel // row, 5))
    return np.concatenate([b for _, b in blocks]).reshape(info.shape)


def _close(got: np.ndarray, want, name: str) -> None:
    want = want.detach().float().numpy() if isinstance(want, torch.Tensor) else want
    assert got.dtype == np.float32 and got.shape == want.shape, name
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= 1e-6, f"{name}: relative error {err:.3g}"


def _check_merge(ck_dir: Path, ad_dir: Path, merged: dict, rename=lambda n: n) -> AdaptedCheckpoint:
    base = Checkpoint(ck_dir)
    ack = AdaptedCheckpoint(base, Adapter.load(ad_dir, base))
    assert ack.merged_names
    for name in ack.merged_names:
        info = ack.info(name)
        assert (info.dtype, info.file, info.start, info.nbytes) == ("F32", None, -1, info.numel * 4), name
        want = merged[rename(name)]
        _close(_streamed(ack, name), want, name)
        _close(ack.raw(name), want, name)
        n_rows = info.numel // info.shape[-1]
        lo, hi = min(3, n_rows - 1), min(9, n_rows)
        _close(ack.rows(name, lo, hi), want.reshape(-1, info.shape[-1])[lo:hi], name)
        with pytest.raises(CheckpointError):
            ack.rows(name, 0, n_rows + 1)
        before = to_f32(base.raw(name), base.info(name).dtype)
        assert np.abs(ack.raw(name) - before).max() > 1e-4, f"{name}: the adapter changed nothing"
    return ack


def _check_untouched(ack: AdaptedCheckpoint) -> None:
    base = ack.base
    assert set(ack.tensors) == set(base.tensors)
    for name, info in base.tensors.items():
        if name in ack.merged_names:
            continue
        assert ack.info(name) == info, name
        assert ack.raw(name).tobytes() == base.raw(name).tobytes(), name
        assert b"".join(b.tobytes() for _, b in ack.iter_rows(name, 1000)) == base.raw(name).tobytes(), name
    assert [t.name for t in ack.tower_tensors] == [t.name for t in base.tower_tensors]


# ---- merging -----------------------------------------------------------------------------------------------------

CONFIGS = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "patterns": dict(r=8, lora_alpha=16, rank_pattern={"layers.1.self_attn.q_proj": 4},
                     alpha_pattern={"layers.2.mlp.down_proj": 64, "o_proj": 3}),
}


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    merged = _train(d, TINY_31B, target_modules=TEXT_LINEARS, **CONFIGS["plain"])
    return d, merged


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_streamed_merge_equals_peft(kind, tmp_path, plain_adapter):
    if kind == "plain":
        d, merged = plain_adapter
    else:
        d, merged = tmp_path, _train(tmp_path, TINY_31B, target_modules=TEXT_LINEARS, seed=1, **CONFIGS[kind])
    with _check_merge(TINY_31B, d, merged) as ack:
        a = ack.arch
        n_linear = sum(7 if a.has_v_proj(i) else 6 for i in range(a.num_layers))
        assert len(ack.merged_names) == n_linear
        mods = {m.module.split("language_model.")[1]: m for m in ack.adapter.modules.values()}
        if kind == "plain":
            assert {m.scale for m in mods.values()} == {2.0}
        elif kind == "rslora":
            assert {m.scale for m in mods.values()} == {16 / 8 ** 0.5}
        else:
            assert (mods["layers.1.self_attn.q_proj"].r, mods["layers.1.self_attn.q_proj"].scale) == (4, 4.0)
            assert mods["layers.2.mlp.down_proj"].scale == 64 / 8
            assert mods["layers.3.self_attn.o_proj"].scale == 3 / 8
            assert mods["layers.0.mlp.up_proj"].scale == 2.0
        _check_untouched(ack)
        desc = ack.describe()
        assert desc["adapter"] == d.name and desc["merged_tensors"] == n_linear
        assert desc["scale_rule"] == ("lora_alpha / sqrt(r)" if kind == "rslora" else "lora_alpha / r")
        assert str(d.parent) not in json.dumps(desc) and "/work" not in json.dumps(desc)


def test_torch_reference_equals_peft(plain_adapter):
    d, merged = plain_adapter
    model = Gemma4ForConditionalGeneration.from_pretrained(TINY_31B, dtype=torch.float32)
    with Checkpoint(TINY_31B) as base:
        adapter = Adapter.load(d, base)
        changed = apply_to_torch_model(model, adapter)
        assert sorted(changed) == sorted(adapter.merged_names)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, merged[k], rtol=1e-6, atol=1e-7), k


def test_embeddings_and_saved_base_layer(tmp_path):
    """LoRA on the (tied) token embedding: peft saves the whole embedding beside lora_embedding_A/B."""
    merged = _train(tmp_path, TINY_31B, target_modules=r".*language_model\.(embed_tokens|layers\.0\.self_attn\.q_proj)",
                    r=4, lora_alpha=8)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.embed_tokens.base_layer.weight" in keys
    with _check_merge(TINY_31B, tmp_path, merged) as ack:
        emb = "model.language_model.embed_tokens.weight"
        assert emb in ack.adapter.replaced and ack.adapter.modules[emb].kind == "embedding"
        assert any("tied" in w for w in ack.describe()["warnings"])


@pytest.mark.parametrize("ckpt,pattern", [
    (TINY_E2B, r".*language_model\.(per_layer_model_projection|embed_tokens_per_layer|"
               r"layers\.\d+\.(per_layer_input_gate|per_layer_projection))"),
    (TINY_MOE, r".*language_model\.layers\.\d+\.(router\.proj|mlp\.down_proj)"),
], ids=["ple", "moe-router"])
def test_other_text_modules(ckpt, pattern, tmp_path):
    merged = _train(tmp_path, ckpt, target_modules=pattern, r=4, lora_alpha=4)
    with _check_merge(ckpt, tmp_path, merged) as ack:
        _check_untouched(ack)


def test_modules_to_save_replaces_the_tensor(tmp_path):
    merged = _train(tmp_path, TINY_31B, target_modules=TEXT_LINEARS, modules_to_save=["language_model.norm"],
                    r=4, lora_alpha=8)
    with _check_merge(TINY_31B, tmp_path, merged) as ack:
        assert list(ack.adapter.replaced) == ["model.language_model.norm.weight"]


def test_text_only_layout_both_ways(tmp_path):
    """An adapter trained on Gemma4ForCausalLM (model.layers.*) merges into the multimodal checkpoint
    (model.language_model.layers.*) and into a text-only one."""
    mm = Gemma4ForConditionalGeneration.from_pretrained(TINY_31B, dtype=torch.bfloat16)
    text = Gemma4ForCausalLM(mm.config.text_config).to(torch.bfloat16)
    text.model.load_state_dict(mm.model.language_model.state_dict())
    text_dir = tmp_path / "text"
    text.save_pretrained(text_dir)
    merged = _train(tmp_path / "ad", text_dir, cls=Gemma4ForCausalLM, target_modules=["q_proj", "down_proj"],
                    r=4, lora_alpha=8)
    with _check_merge(text_dir, tmp_path / "ad", merged) as ack:
        assert ack.text_prefix == "model." and len(ack.merged_names) == 12
        _check_untouched(ack)
    with _check_merge(TINY_31B, tmp_path / "ad", merged,
                      rename=lambda n: n.replace("model.language_model.", "model.")) as ack:
        assert len(ack.merged_names) == 12
    model = Gemma4ForConditionalGeneration.from_pretrained(TINY_31B, dtype=torch.float32)
    with Checkpoint(TINY_31B) as base:
        apply_to_torch_model(model, Adapter.load(tmp_path / "ad", base))
    sd = model.state_dict()
    for k, v in merged.items():
        mk = k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k
        assert torch.allclose(sd[mk], v, rtol=1e-6, atol=1e-7), k


def test_adapter_trained_on_the_base_text_class(tmp_path):
    """An adapter trained on Gemma4TextModel (AutoModel's class: module paths layers.*, no "model.") merges into the
    multimodal checkpoint as peft merges it there."""
    mm = Gemma4ForConditionalGeneration.from_pretrained(TINY_31B, dtype=torch.bfloat16)
    text = Gemma4TextModel(mm.config.text_config).to(torch.bfloat16)
    text.load_state_dict(mm.model.language_model.state_dict())
    text_dir = tmp_path / "text"
    text.save_pretrained(text_dir)
    merged = _train(tmp_path / "ad", text_dir, cls=Gemma4TextModel, target_modules=["q_proj", "down_proj"],
                    r=4, lora_alpha=8)
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.layers.") for k in keys)
    with _check_merge(TINY_31B, tmp_path / "ad", merged,
                      rename=lambda n: n.replace("model.language_model.", "")) as ack:
        assert len(ack.merged_names) == 12
    with _check_merge(text_dir, tmp_path / "ad", merged, rename=lambda n: n.removeprefix("model.")) as ack:
        assert ack.base.base_layout and len(ack.merged_names) == 12


# ---- refusals ----------------------------------------------------------------------------------------------------

A0 = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"


def _edit(src: Path, dst: Path, config=None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(dst / "adapter_model.safetensors")
        tensors(t)
        save_file(t, dst / "adapter_model.safetensors")
    return dst


def _refused(d: Path, *words: str, base_dir: Path = TINY_31B) -> str:
    with Checkpoint(base_dir) as base:
        with pytest.raises(CheckpointError) as e:
            Adapter.load(d, base)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def _set(**kv):
    return lambda cfg: cfg.update(kv)


def _unlink(*names):
    def go(d: Path) -> Path:
        for n in names:
            (d / n).unlink()
        return d
    return go


REFUSALS = {
    "no-config": (lambda src, d: _unlink("adapter_config.json")(_edit(src, d)), ["no adapter_config.json"]),
    "bad-config": (lambda src, d: (_edit(src, d) / "adapter_config.json").write_text("{r: 8") and d,
                   ["unreadable adapter config"]),
    "no-weights": (lambda src, d: _unlink("adapter_model.safetensors")(_edit(src, d)),
                   ["no adapter_model.safetensors"]),
    "not-lora": (lambda src, d: _edit(src, d, config=_set(peft_type="IA3")), ["peft_type", "IA3"]),
    "dora": (lambda src, d: _edit(src, d, config=_set(use_dora=True)), ["DoRA is not supported"]),
    "lora-bias": (lambda src, d: _edit(src, d, config=_set(lora_bias=True)), ["lora_bias"]),
    "pissa": (lambda src, d: _edit(src, d, config=_set(init_lora_weights="pissa")), ["pissa", "modified base"]),
    "experts-config": (lambda src, d: _edit(src, d, config=_set(target_parameters=["experts.gate_up_proj"])),
                       ["target_parameters", "MoE experts"]),
    "wrong-rank": (lambda src, d: _edit(src, d, config=_set(r=4)), ["rank 8", "r=4"]),
    "unselected": (lambda src, d: _edit(src, d, config=_set(target_modules=r".*language_model.*\.q_proj")),
                   ["does not select", "k_proj"]),
    "shape": (lambda src, d: _edit(src, d, tensors=lambda t: t.update({A0: np.zeros((8, 128), np.float32)})),
              ["model.language_model.layers.0.self_attn.q_proj.weight", "[256, 256]", "A [8, 128]", "B [256, 8]"]),
    "missing-half": (lambda src, d: _edit(src, d, tensors=lambda t: t.pop(A0)), ["has no lora_A"]),
    "not-in-base": (lambda src, d: _edit(src, d, tensors=lambda t: t.update(
        {k.replace("layers.0.", "layers.99."): v for k, v in list(t.items()) if "layers.0.self_attn.q_proj" in k})),
        ["layers.99.self_attn.q_proj", "no tensor in the base checkpoint"]),
    "norm": (lambda src, d: _edit(src, d, config=_set(target_modules=None), tensors=lambda t: t.update({
        "base_model.model.model.language_model.norm.lora_A.weight": np.zeros((8, 256), np.float32),
        "base_model.model.model.language_model.norm.lora_B.weight": np.zeros((256, 8), np.float32)})),
        ["norm.weight", "not a linear layer"]),
    "lm-head-tied": (lambda src, d: _edit(src, d, config=_set(target_modules=None), tensors=lambda t: t.update({
        "base_model.model.lm_head.lora_A.weight": np.zeros((8, 256), np.float32),
        "base_model.model.lm_head.lora_B.weight": np.zeros((1024, 8), np.float32)})),
        ["lm_head", "ties"]),
    "magnitude": (lambda src, d: _edit(src, d, tensors=lambda t: t.update({
        A0.replace("lora_A.weight", "lora_magnitude_vector"): np.ones(256, np.float32)})), ["DoRA"]),
    "stray-tensor": (lambda src, d: _edit(src, d, tensors=lambda t: t.update({
        "base_model.model.model.language_model.norm.weight": np.ones(256, np.float32)})), ["no modules_to_save"]),
    "pickle": (lambda src, d: _pickle_only(_edit(src, d)), ["pickle-only", "adapter_model.bin"]),
}


def _pickle_only(d: Path) -> Path:
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    return d


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, plain_adapter, tmp_path):
    make, words = REFUSALS[case]
    src, _ = plain_adapter
    d = tmp_path / "broken"
    make(src, d)
    _refused(d, *words)


def test_refuses_trained_tower_modules(tmp_path):
    """peft's all-linear on the multimodal class also wraps the vision tower's inner linears; trained ones (lora_B
    not zero) would change the towers, which no artifact here merges."""
    _train(tmp_path, TINY_31B, target_modules="all-linear", r=2, lora_alpha=2)
    msg = _refused(tmp_path, "trains vision/audio tower", "model.vision_tower.")
    assert "language_model" not in msg.split("tower")[0]


@pytest.mark.parametrize("cls", [Gemma4ForConditionalGeneration, Gemma4Model])
def test_untrained_tower_modules_are_skipped(tmp_path, cls):
    """all-linear after a text-only fine-tune: the towers' lora_B never left peft's zero start, so their merge is
    the identity; the text modules merge as peft's merge_and_unload does, the towers stay as they are. Also for an
    adapter trained on the base class (Gemma4Model: module paths vision_tower.*, language_model.*)."""
    model = cls.from_pretrained(TINY_31B, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(target_modules="all-linear", r=2, lora_alpha=4))
    _randomize(pm, 3)
    with torch.no_grad():
        towers = [p for n, p in pm.named_parameters() if "lora_B" in n and "language_model" not in n]
        for p in towers:
            p.zero_()
    assert towers
    pm.save_pretrained(tmp_path)
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    rename = (lambda n: n) if cls is Gemma4ForConditionalGeneration else (lambda n: n.removeprefix("model."))
    with _check_merge(TINY_31B, tmp_path, merged, rename=rename) as ack:
        assert ack.merged_names and all("language_model" in n for n in ack.merged_names)
        assert any("never trained" in w for w in ack.adapter.warnings)
        _check_untouched(ack)


def test_refuses_moe_experts(tmp_path):
    """LoRA on the experts' nn.Parameters (target_parameters), with the config flag and without it."""
    _train(tmp_path / "a", TINY_MOE, target_modules=r".*language_model\.layers\.0\.mlp\.up_proj",
           target_parameters=["experts.gate_up_proj"], r=2, lora_alpha=2)
    assert any(".experts.lora_A" in k for k in load_file(tmp_path / "a" / "adapter_model.safetensors"))
    _refused(tmp_path / "a", "target_parameters", base_dir=TINY_MOE)
    d = _edit(tmp_path / "a", tmp_path / "b", config=_set(target_parameters=None))
    _refused(d, "layers.0.experts", "MoE experts", base_dir=TINY_MOE)
