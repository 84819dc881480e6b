"""Every checkpoint layout transformers' own Gemma 4 classes write (tests/layouts.py), through every target, against
transformers on that very checkpoint.

Two kinds of check:
- Layouts whose weights are the hub tiny model's own (text-only class, towers on/off, fp32 on disk, shards, the base
  classes' saves, the 12B unified class, a K==V model): every target at a float and a quantized preset gives tensor data
  byte-identical to the artifact of the hub-layout checkpoint (which test_gguf/test_onnx/test_mlx validate in full),
  and the float artifacts are also validated against transformers on the layout itself.
- Layouts with weights of their own (an untied head, a resized vocabulary with added tokens, softcapping off, fp16
  on disk, an MoE model with an untied head): validated in full (the standard windows and prompts, the presets' own thresholds)
  at a float and a quantized preset per target; the added tokens are checked token by token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gemma4_export import api
from gemma4_export.targets.registry import get_target
from conftest import MLX_QUANT_PROMPTS, MLX_QUANT_WINDOWS
from layouts import ADDED_TOKENS, LAYOUTS, build

pytestmark = pytest.mark.slow

FLOAT = {"gguf": "f32", "onnx": "fp32", "mlx": "bf16"}
QUANT = {"gguf": "q4_k_m", "onnx": "int4", "mlx": "4bit"}
# fp32 holds bf16 values exactly; fp16 does not (its exponent is narrower), so an fp16 save has weights of its own
SAME_WEIGHTS = ["causal-lm", "multimodal", "vision-only", "no-towers", "fp32-sharded", "unified-12b", "k-eq-v-31b",
                "base-model", "text-base-model"]
OWN_WEIGHTS = ["untied-head", "resized-vocab", "no-softcap", "fp16", "moe-26b"]
assert sorted(SAME_WEIGHTS + OWN_WEIGHTS) == sorted(LAYOUTS)


def _available(target: str) -> None:
    from gemma4_export.errors import Gemma4ExportError

    try:
        get_target(target).require()
        if target == "gguf":
            import llama_cpp  # noqa: F401
    except (Gemma4ExportError, ImportError) as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def checkpoint(root):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = build(name, root / name)
        return made[name]
    return get


@pytest.fixture(scope="module")
def references(checkpoint):
    refs: dict[str, object] = {}

    def get(name: str, windows: int | None = None, prompts: int | None = None):
        key = (name, windows, prompts)
        if key not in refs:
            refs[key] = api.reference(model_dir=checkpoint(name), windows=windows, prompts=prompts)
        return refs[key]
    return get


def _spec(target: str, preset: str) -> tuple[int | None, int | None]:
    """(windows, prompts) of a full validation: the standard evaluation, except a quantized MLX preset's shorter
    one (conftest.MLX_QUANT_WINDOWS)."""
    quant_mlx = target == "mlx" and preset != FLOAT[target]
    return (MLX_QUANT_WINDOWS, MLX_QUANT_PROMPTS) if quant_mlx else (None, None)


def _tensor_bytes(target: str, path: Path) -> dict[str, bytes]:
    """Every weight's stored bytes, by the artifact's own tensor name (metadata and names of the source aside)."""
    if target == "gguf":
        from gemma4_export.targets.gguf_file import read_gguf

        g = read_gguf(path, arrays=False)
        with open(path, "rb") as f:
            out = {}
            for n, t in g.tensors.items():
                f.seek(t.offset)
                out[n] = f.read(t.nbytes)
            return out
    if target == "mlx":
        from safetensors.numpy import load_file

        out = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update({k: v.tobytes() for k, v in load_file(str(f)).items()})
        return out
    return {f.name: f.read_bytes() for f in sorted((path / "onnx").glob("*.onnx_data*"))}


@pytest.fixture(scope="module")
def hub_bytes(root):
    """The hub-layout checkpoint's artifact tensors per (base, target, preset), exported once for every layout."""
    made: dict[tuple, dict[str, bytes]] = {}

    def get(base: str, target: str, preset: str) -> dict[str, bytes]:
        if (base, target, preset) not in made:
            hub = api.export(target, base, preset, root / "hub-out", force=True, towers=False)
            made[base, target, preset] = _tensor_bytes(target, hub.path)
        return made[base, target, preset]
    return get


@pytest.mark.parametrize("target", ["gguf", "onnx", "mlx"])
@pytest.mark.parametrize("layout", SAME_WEIGHTS)
def test_same_weights_same_artifact(layout, target, checkpoint, root, references, hub_bytes):
    _available(target)
    lay = LAYOUTS[layout]
    d = checkpoint(layout)
    # the base classes' saves differ from the head classes' in their tensor names alone, which the float artifact
    # shows byte for byte: the quantized one adds nothing there but minutes
    for preset in (FLOAT[target],) if lay.base_class else (FLOAT[target], QUANT[target]):
        # the text artifact (a text-only save has no towers to add; test_mmproj, test_mlx_towers and
        # test_onnx_towers cover the towers' artifacts)
        mine = api.export(target, d, preset, root / f"{layout}-out", force=True, towers=False)
        a, b = hub_bytes(lay.base, target, preset), _tensor_bytes(target, mine.path)
        assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
        differ = [n for n in a if a[n] != b[n]]
        assert not differ, f"{layout} {target} {preset}: {differ[:5]} differ from the hub layout's artifact"
        if preset == FLOAT[target] and target != "mlx":  # mlx-lm computes in bf16: see the full validations
            rep = api.validate(mine.path, d, windows=2, prompts=2, write=False, reference=references(layout, 2, 2))
            assert rep.passed, (layout, target, rep.failures)


@pytest.mark.parametrize("target", ["gguf", "onnx", "mlx"])
@pytest.mark.parametrize("layout", OWN_WEIGHTS)
def test_own_weights_validate_in_full(layout, target, checkpoint, root, references):
    _available(target)
    d = checkpoint(layout)
    presets = [FLOAT[target]]
    # MLX's quantized kernels are slow on a CPU (over 2 minutes a validation): the quantized MLX path runs on the
    # layout whose head is its own, the one part of the artifact that differs from a tied model's
    if target != "mlx" or layout == "untied-head":
        presets.append(QUANT[target])
    for preset in presets:
        r = api.export(target, d, preset, root / f"{layout}-out", force=True)
        rep = api.validate(r.path, d, write=False, reference=references(layout, *_spec(target, preset)))
        lg, gm = rep.logits, rep.generation
        print(f"\n{layout} {target} {preset}: KLD {lg.kld_mean:.3g} top-1 {lg.top1_agreement:.4f} "
              f"PPL ratio {lg.ppl_ratio:.5f} greedy exact {gm.exact_match_rate:.3f} "
              f"first div {gm.mean_first_divergence:.1f} max diff {lg.max_logit_diff:.3g}")
        assert rep.passed, (layout, target, preset, rep.failures)
        if layout == "resized-vocab":
            from gemma4_export.validate.reference import WholeModelReference

            _added_tokens_match(target, r.path, preset, d, WholeModelReference(d))


def _added_tokens_match(target, path, preset, d, ref, tokens=ADDED_TOKENS):
    """The added tokens are tokenized as transformers does and get transformers' logits, as inputs and as
    predictions (the new rows of the embedding, the PLE table and the head)."""
    from gemma4_export.validate.harness import EvalSpec

    cfg = json.loads((d / "config.json").read_text())
    vocab = (cfg.get("text_config") or cfg)["vocab_size"]
    text = f"def f(x):{tokens[0]} return x{tokens[1]}{tokens[2]} done"
    ids = ref.tokenize(text)
    added = ref.tokenizer.get_added_vocab()  # their ids: the rows after the tokenizer's, before any padding rows
    new = [added[t] for t in tokens]
    assert set(new) <= set(ids) and max(new) < vocab, (ids, new, vocab)
    t = get_target(target)
    runner = t.make_runner(path, EvalSpec(256, 1, 1, 8), "cpu", preset)
    try:
        if hasattr(runner, "tokenize"):
            assert runner.tokenize(text) == ids
        seq = [2] + ids
        r, a = ref.logits(seq), runner.logits(seq)
        assert a.shape == r.shape and r.shape[-1] == vocab
        tol = {"gguf": 0.05, "onnx": 1e-3, "mlx": 0.5}[target] if preset == FLOAT[target] else 2.5
        assert np.abs(a - r).max() < tol
        assert np.abs(a[:, new] - r[:, new]).max() < tol  # the new rows of the head
        if preset == FLOAT[target] and target != "mlx":
            assert (a.argmax(-1) == r.argmax(-1)).all()
    finally:
        if hasattr(runner, "close"):
            runner.close()


@pytest.mark.parametrize("target", ["gguf", "onnx", "mlx"])
def test_shipped_finetune_validates_in_full(target, root):
    """tiny-e2b-ft: a trained fine-tune in the layout save_pretrained writes, with tokens added to its vocabulary,
    validated in full at a float and a quantized preset per target."""
    from gemma4_export.exporter.variants import get_variant
    from gemma4_export.validate.reference import WholeModelReference

    _available(target)
    d = get_variant("tiny-e2b-ft").local_dir
    assert not any("layers.9.self_attn.k_proj" in line for line in (d / "model.safetensors").open("rb").read(20000)
                   .decode("latin-1").split('"'))  # saved by transformers: KV-shared layers carry no k/v
    refs = {spec: api.reference("tiny-e2b-ft", windows=spec[0], prompts=spec[1])
            for spec in {_spec(target, p) for p in (FLOAT[target], QUANT[target])}}
    whole = WholeModelReference(d)  # full-vocabulary logits of chosen tokens, for the added rows
    for preset in (FLOAT[target], QUANT[target]):
        r = api.export(target, "tiny-e2b-ft", preset, root / "ft-out", force=True)
        # the checkpoint is found from the artifact's own record
        rep = api.validate(r.path, write=False, reference=refs[_spec(target, preset)])
        lg = rep.logits
        print(f"\ntiny-e2b-ft {target} {preset}: {r.bytes / 1e6:.2f} MB KLD {lg.kld_mean:.3g} "
              f"top-1 {lg.top1_agreement:.4f} PPL ratio {lg.ppl_ratio:.5f} "
              f"greedy exact {rep.generation.exact_match_rate:.3f}")
        assert rep.passed, (target, preset, rep.failures)
        _added_tokens_match(target, r.path, preset, d, whole, tokens=["<tool_call>", "</tool_call>",
                                                                       "<tool_response>"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_streamed_reference_equals_the_whole_model(layout, checkpoint):
    """The streamed fp32 reference (one decoder layer at a time, the checkpoint reader's names) gives the logits of
    transformers' own class loaded whole by from_pretrained, in every layout: within 1e-4, past the sliding window."""
    from gemma4_export.validate.reference import WholeModelReference
    from gemma4_export.validate.streamed import StreamedModel

    d = checkpoint(layout)
    whole = WholeModelReference(d)
    ids = [2] + whole.tokenize("def walk(tree):\n    for node in tree.children:\n        yield node\n" * 12)[:299]
    sm = StreamedModel(d, keep_bytes=0)
    try:
        a = sm.logits(sm.final_hidden([ids])[0])
    finally:
        sm.close()
    b = whole.logits(ids)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4, (layout, float(np.abs(a - b).max()))
