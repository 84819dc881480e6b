"""Base model + LoRA adapter through every target: `--adapter DIR` merges the adapter in fp32 while the weights
stream, the artifact runs in its own runtime, and it matches transformers' merged model (the reference) within the
preset's limits. The merge is real: the same artifact against the base alone fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("peft")
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Gemma4ForConditionalGeneration  # noqa: E402

from gemma4_export import api  # noqa: E402
from gemma4_export.errors import Gemma4ExportError  # noqa: E402
from gemma4_export.exporter.variants import get_variant  # noqa: E402
from gemma4_export.targets.registry import get_target  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
BASE = "tiny-31b"
TEXT_LINEARS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA that moves the model clearly (peft starts B at zero; a trained one would not be), by about as much as
    a fine-tune: mean KLD against the base about 0.008."""
    d = tmp_path_factory.mktemp("adapter") / "my-lora"
    model = Gemma4ForConditionalGeneration.from_pretrained(get_variant(BASE).local_dir, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TEXT_LINEARS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.03)
    pm.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference(adapter):
    """The merged model's fp32 reference results (streamed; the adapter merged as tensors are read)."""
    return api.reference(BASE, adapter=adapter)


@pytest.fixture(scope="module")
def whole_reference(adapter):
    """The merged model loaded whole by transformers, the adapter merged by torch: an independent merge."""
    from gemma4_export.validate.reference import WholeModelReference

    return WholeModelReference(get_variant(BASE).local_dir, adapter=adapter)


@pytest.mark.parametrize("target, preset", [("gguf", "f32"), ("gguf", "q4_k_m"), ("onnx", "fp32"), ("onnx", "int4"),
                                            ("mlx", "bf16")])
def test_adapter_export_matches_the_merged_model(target, preset, adapter, reference, whole_reference, tmp_path):
    try:
        get_target(target).require()
    except Gemma4ExportError as e:
        pytest.skip(str(e))
    r = api.export(target, BASE, preset, tmp_path, adapter=adapter)
    assert r.path.name.startswith(f"{BASE}-my-lora")
    merged = {e.name for e in r.plan.entries if "LoRA adapter merged" in e.reason}
    linears = {e.name for e in r.plan.entries if e.role in ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate",
                                                              "mlp_up", "mlp_down")}
    assert merged == linears and len(merged) == 41  # 7 per layer, less the v_proj K==V full layer 5 does not have
    rep = api.validate(r.path, BASE, adapter=adapter, write=False, reference=reference)
    assert rep.passed, rep.failures
    assert rep.reference["adapter"] == "my-lora (merged in fp32)"
    # the merge matters: the base alone is a different model, and validation says so
    with pytest.raises(Gemma4ExportError, match="pass --adapter"):
        api.validate(r.path, BASE, write=False)
    if preset in ("f32", "fp32"):
        # the merged artifact is far from the base model, and close to the merged reference, on the same tokens
        from gemma4_export.validate.harness import EvalSpec
        from gemma4_export.validate.metrics import TokenStats, summarize
        from gemma4_export.validate.texts import heldout_text

        ids = [2] + whole_reference.tokenize(heldout_text())[:255]
        runner = get_target(target).make_runner(r.path, EvalSpec(256, 1), "cpu", preset)
        art = runner.logits(ids)
        if hasattr(runner, "close"):
            runner.close()
        kld = {}
        for name, ref in (("merged", whole_reference), ("base", _base_reference())):
            st = TokenStats.empty()
            st.add(ref.logits(ids)[:-1], art[:-1], ids[1:])
            kld[name] = summarize(st).kld_mean
        limit = get_target(target).preset(preset).thresholds.kld_mean
        # against the base alone this artifact would fail its preset's KLD limit many times over
        assert kld["base"] > 10 * limit and kld["base"] > 1000 * kld["merged"], kld


_BASE_REF = {}


def _base_reference():
    from gemma4_export.validate.reference import WholeModelReference

    if "r" not in _BASE_REF:
        _BASE_REF["r"] = WholeModelReference(get_variant(BASE).local_dir)
    return _BASE_REF["r"]


def test_cli_adapter_and_its_errors(adapter, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "gemma4_export.cli", *a], capture_output=True,  # noqa
                                    text=True, timeout=600)
    p = run("gguf", "--variant", BASE, "--quant", "q8_0", "--adapter", str(adapter), "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / f"{BASE}-my-lora-q8_0.gguf").is_file() and "PASS" in p.stdout
    p = run("plan", "--variant", BASE, "--adapter", str(adapter))
    assert p.returncode == 0 and "LoRA adapter merged" in p.stdout
    bad = tmp_path / "dora"
    bad.mkdir()
    import json
    import shutil

    for f in adapter.iterdir():
        shutil.copy(f, bad / f.name)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    p = run("onnx", "--variant", BASE, "--adapter", str(bad), "--out", str(tmp_path))
    assert p.returncode == 2 and "DoRA" in p.stderr and "Traceback" not in p.stderr
    p = run("mlx", "--variant", "tiny-e2b", "--adapter", str(adapter), "--out", str(tmp_path))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr


def test_streamed_reference_with_adapter_equals_the_torch_merge(adapter, whole_reference):
    """The streamed reference merges the adapter as tensors are read (the exporter's AdaptedCheckpoint); the whole
    model merges it with torch (apply_to_torch_model): two merges, one answer."""
    import numpy as np

    from gemma4_export.validate.streamed import StreamedModel
    from gemma4_export.validate.texts import heldout_text

    ids = [2] + whole_reference.tokenize(heldout_text())[:200]
    sm = StreamedModel(get_variant(BASE).local_dir, adapter=adapter, keep_bytes=0)
    try:
        a = sm.logits(sm.final_hidden([ids])[0])
    finally:
        sm.close()
    assert np.abs(a - whole_reference.logits(ids)).max() <= 1e-4
    assert np.abs(a - _base_reference().logits(ids)).max() > 0.1  # and the adapter changed the model
