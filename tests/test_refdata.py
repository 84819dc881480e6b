"""The streamed fp32 reference and stored reference results (validate/streamed.py, validate/refdata.py).

The streamed model is held to transformers' own whole-model class loaded by `from_pretrained` (an independent
loader and forward): same logits and same greedy continuations on every tiny variant. Its streaming is checked by
what it reads (each layer once per pass, no tower, only the embedding rows in use), the compact log-probabilities
against the full-vocabulary metrics of real artifacts, and the stored form by a round trip and by its refusals.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gemma4_export import api
from gemma4_export.errors import Gemma4ExportError
from gemma4_export.exporter.source import ModelSource
from gemma4_export.exporter.variants import TINY, get_variant
from gemma4_export.validate.harness import EvalSpec
from gemma4_export.validate.metrics import TokenStats, summarize
from gemma4_export.validate.refdata import ReferenceData, ReferenceMismatch
from gemma4_export.validate.reference import WholeModelReference
from gemma4_export.validate.streamed import StreamedModel

SMALL = EvalSpec(window=256, windows=2, prompts=3, new_tokens=24)


@pytest.fixture(scope="module")
def whole():
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()
            cache[name] = WholeModelReference(get_variant(name).local_dir)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def computed():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = ReferenceData.compute(ModelSource.open(name, need_weights=True), SMALL)
        return cache[name]
    return get


@pytest.mark.parametrize("variant", TINY)
def test_streamed_logits_equal_the_whole_model(variant, whole):
    ref = whole(variant)
    rng = np.random.default_rng(1)
    vocab = ref.model.config.get_text_config().vocab_size
    # Text only: the multimodal class treats its image/audio/video placeholder ids as media slots (their embeddings
    # are replaced), which text never holds; the streamed model is the text model, as llama.cpp's is.
    media = {v for k, v in ref.model.config.to_dict().items() if k.endswith("_token_id") and isinstance(v, int)
             and k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    pool = np.array([i for i in range(3, vocab) if i not in media])
    # longer than the sliding window (64 in the tiny configs), and a short one, through one pass of the layers
    seqs = [[2] + rng.choice(pool, 300).tolist(), [2] + rng.choice(pool, 17).tolist()]
    sm = StreamedModel(get_variant(variant).local_dir, keep_bytes=0)
    try:
        hs = sm.final_hidden(seqs)
        for s, h in zip(seqs, hs):
            a, b = sm.logits(h), ref.logits(s)
            assert a.shape == b.shape == (len(s), vocab)
            assert np.abs(a - b).max() <= 1e-4
        # the reduced head gives the full head's answers
        r = sm.reduce(hs[0], np.asarray(seqs[0][1:] + [0]), 5)
        full = sm.logits(hs[0]).astype(np.float64)
        lse = np.log(np.exp(full - full.max(1, keepdims=True)).sum(1)) + full.max(1)
        assert np.allclose(r["lse"], lse, atol=1e-6)
        assert (r["top_ids"][:, 0] == full.argmax(1)).all()
        assert np.allclose(r["target_logit"], full[np.arange(len(full)), seqs[0][1:] + [0]], atol=1e-5)
    finally:
        sm.close()


@pytest.mark.parametrize("variant", TINY)
def test_streamed_greedy_equals_the_whole_model(variant, whole, computed):
    data, ref = computed(variant), whole(variant)
    eos = data.eos_ids
    for g in data.generations:
        want = ref.greedy(g.ids, SMALL.new_tokens)
        cut = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
        assert g.tokens == want[:cut]
        assert len(g.margins) == len(g.second) == len(g.tokens)
        assert all(m >= 0 for m in g.margins) and all(s != t for s, t in zip(g.second, g.tokens))
    # and the stored log-probability of each scored token is the whole model's
    for w, win in enumerate(data.windows):
        full = ref.logits(win.ids).astype(np.float64)[win.half:-1]
        lp = full - (np.log(np.exp(full - full.max(1, keepdims=True)).sum(1)) + full.max(1))[:, None]
        c = data.compact(w)
        assert np.abs(c.target_logprob - lp[np.arange(len(c)), win.ids[win.half + 1:]]).max() < 1e-4
        assert (c.top1 == full.argmax(1)).all()


def test_streaming_reads_each_layer_per_pass_and_never_a_tower(monkeypatch):
    d = get_variant("tiny-e2b").local_dir
    read: list[str] = []
    from gemma4_export.exporter.checkpoint import Checkpoint

    orig = {m: getattr(Checkpoint, m) for m in ("raw", "rows", "read_into", "iter_rows")}

    def spy(method):
        def f(self, name, *a):
            rows = a[1] if method == "read_into" and len(a) > 1 else (a if method == "rows" else None)
            read.append(f"{name}[{rows[0]}:{rows[1]}]" if rows else name)
            return orig[method](self, name, *a)
        return f
    for m in orig:
        monkeypatch.setattr(Checkpoint, m, spy(m))
    sm = StreamedModel(d, keep_bytes=0)
    n_layers = sm.config.num_hidden_layers
    try:
        ids = [2, 10, 11, 12, 500]
        sm.final_hidden([ids])
        sm.final_hidden([[7]])
    finally:
        sm.close()
    assert sm.layers_read == 2 * n_layers  # nothing kept: every pass reads every layer again
    assert not [n for n in read if "tower" in n or "embed_vision" in n or "embed_audio" in n]
    embd = [n for n in read if "embed_tokens.weight[" in n]
    # rows of the ids in use only, in runs of consecutive ids: [2], [10..12], [500]; then [7]
    assert embd == [f"model.language_model.embed_tokens.weight[{a}:{b}]" for a, b in
                    ((2, 3), (10, 13), (500, 501), (7, 8))]


@pytest.mark.parametrize("variant", ["tiny-e2b", "tiny-26b-a4b"])
def test_streamed_mlps_run_on_blocks_of_tokens(variant, monkeypatch):
    """A dense MLP sees at most MLP_ROWS tokens at a time (a double-wide MLP over a whole calibration chunk would hold
    150 MB of intermediates), and the hidden states come out as with the whole sequence at once; the MoE layers'
    shared MLP too."""
    from gemma4_export.validate import streamed

    seq = [2] + np.random.default_rng(0).integers(3, 200, 299).tolist()
    whole = StreamedModel(get_variant(variant).local_dir).final_hidden([seq])[0].numpy()
    monkeypatch.setattr(streamed, "MLP_ROWS", 64)
    sm = StreamedModel(get_variant(variant).local_dir)
    rows: list[int] = []
    for layer in sm.shell.layers:
        layer.mlp.gate_proj.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[-2]))
    got = sm.final_hidden([seq])[0].numpy()
    assert len(rows) == 5 * sm.config.num_hidden_layers and max(rows) == 64 and sum(rows) == 300 * len(sm.shell.layers)
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["tiny-26b-a4b", "tiny-31b", "tiny-e2b"])
def test_streamed_weights_match_transformers(variant, monkeypatch):
    """Large weights read as their module runs (MoE experts one expert at a time, linear layers in blocks of rows;
    26B-A4B's experts are 3.1 GB in float32, 31B's layers 2.1 GB) give bitwise what transformers' modules give with
    them loaded, hold one expert's weights or one block of rows instead of all, are never loaded with their layer,
    and give calibration the same statistics."""
    from gemma4_export.quant.calibrate import calibration_set, collect
    from gemma4_export.validate import lazy, streamed
    from gemma4_export.validate.lazy import StreamedExperts, StreamedLinear

    rng = np.random.default_rng(1)
    seqs = [[2] + rng.integers(3, 200, n).tolist() for n in (300, 77)]
    d = get_variant(variant).local_dir
    loaded = StreamedModel(d, keep_bytes=0)
    assert not loaded._streamed  # the tiny models' layers are small
    monkeypatch.setattr(streamed, "STREAM_EXPERTS_BYTES", 0)
    monkeypatch.setattr(streamed, "STREAM_LINEAR_BYTES", 0)
    monkeypatch.setattr(lazy, "BLOCK_BYTES", 40 << 10)  # several blocks per matrix, the last one short
    sm = StreamedModel(d, keep_bytes=0)
    reads: list[tuple[str, int, int]] = []
    real_read = sm.read_rows
    sm.read_rows = lambda name, a, b, out: reads.append((name, a, b)) or real_read(name, a, b, out)
    for a, b in zip(loaded.final_hidden(seqs), sm.final_hidden(seqs)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    layers = sm.config.num_hidden_layers
    assert sorted(sm._streamed) == list(range(layers))
    kinds = {type(m) for mods in sm._streamed.values() for m in mods.values()}
    assert kinds == ({StreamedLinear, StreamedExperts} if variant == "tiny-26b-a4b" else {StreamedLinear})
    for i in range(layers):
        layer = sm.shell.layers[i]
        assert set(sm._streamed[i]) | set(sm._loaded_names(i)) == set(sm._layer_names(i))
        assert not any(isinstance(m, torch_linear()) for m in layer.modules())  # every matrix is streamed
        assert all(t.device.type == "meta" for t in layer.parameters())  # released: no memory behind them
    lin = [m for mods in sm._streamed.values() for m in mods.values() if isinstance(m, StreamedLinear)]
    assert any(m.out_features % m.rows for m in lin) and all(m.rows * m.in_features * 4 <= 40 << 10 for m in lin)
    assert {m.scratch_shapes for m in lin} == {((10 << 10,),)}  # one buffer for linear layers of every shape
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, a, b in reads:
        by_name.setdefault(name, []).append((a, b))
    assert all(b - a <= m.rows for m in lin for a, b in by_name[m.weight_name])
    assert {s for s in sm._scratch} == {s for mods in sm._streamed.values() for m in mods.values()
                                         for s in m.scratch_shapes}
    assert sm.layer_bytes() < loaded.layer_bytes() / 4
    loaded.close()
    sm.close()

    src = api.open_source(variant, need_weights=True)
    calib = calibration_set(src.checkpoint.dir, src.arch.bos_token_id, chunk=128, chunks=2)
    streaming = collect(src, calib, hessians=True)
    monkeypatch.setattr(streamed, "STREAM_EXPERTS_BYTES", 1 << 40)
    monkeypatch.setattr(streamed, "STREAM_LINEAR_BYTES", 1 << 40)
    plain = collect(src, calib, hessians=True)
    assert set(streaming.sums) == set(plain.sums) and len(plain.sums) >= 6 * layers
    for n in plain.sums:
        np.testing.assert_array_equal(streaming.counts[n], plain.counts[n])
        np.testing.assert_allclose(streaming.sums[n], plain.sums[n], rtol=1e-6, err_msg=n)
    assert set(streaming.hessians) == set(plain.hessians)
    for n, (h, width) in plain.hessians.items():
        assert streaming.hessians[n][1] == width
        np.testing.assert_allclose(np.asarray(streaming.hessians[n][0]), np.asarray(h), rtol=1e-5,
                                   atol=1e-6 * float(np.abs(np.asarray(h)).max()), err_msg=n)


@pytest.mark.parametrize("variant", ["tiny-26b-a4b", "tiny-31b"])
def test_linears_beside_streamed_experts_stream_at_the_lower_size(variant, monkeypatch):
    """Where a layer's experts are streamed, its linear layers over STREAM_LINEAR_BESIDE_EXPERTS_BYTES are streamed
    too (26B-A4B's attention), bitwise as before; a dense model's linears keep the plain threshold."""
    from gemma4_export.validate import streamed
    from gemma4_export.validate.lazy import StreamedExperts, StreamedLinear

    rng = np.random.default_rng(2)
    seqs = [[2] + rng.integers(3, 200, 150).tolist()]
    d = get_variant(variant).local_dir
    want = StreamedModel(d, keep_bytes=0).final_hidden(seqs)[0].numpy()
    monkeypatch.setattr(streamed, "STREAM_EXPERTS_BYTES", 0)
    monkeypatch.setattr(streamed, "STREAM_LINEAR_BYTES", 1 << 40)
    monkeypatch.setattr(streamed, "STREAM_LINEAR_BESIDE_EXPERTS_BYTES", 0)
    sm = StreamedModel(d, keep_bytes=0)
    kinds = [{type(m) for m in sm._streamed.get(i, {}).values()} for i in range(sm.config.num_hidden_layers)]
    if variant == "tiny-26b-a4b":
        assert all(k == {StreamedExperts, StreamedLinear} for k in kinds)
        assert {"self_attn.q_proj.weight", "self_attn.o_proj.weight"} <= set(sm._streamed[0])
    else:
        assert not any(kinds)  # no experts: the linears keep STREAM_LINEAR_BYTES
    np.testing.assert_array_equal(sm.final_hidden(seqs)[0].numpy(), want)
    sm.close()


def torch_linear():
    import torch

    return torch.nn.Linear


@pytest.mark.parametrize("variant", ["tiny-31b", "tiny-26b-a4b", "tiny-e2b"])
def test_stored_keys_and_values_go_once_no_layer_reads_them(variant):
    """transformers' last layer of each attention type stores its keys and values for assistant models even where
    no layer shares them: the streamed model lets them go after that layer (31B: 48 MB per 1,024-token sequence);
    where KV-shared layers read them (E2B) they stay to the last layer. (The results are the whole model's:
    test_streamed_logits_equal_the_whole_model.)"""
    sm = StreamedModel(get_variant(variant).local_dir, keep_bytes=0)
    cfg = sm.config
    modes = cfg.kv_sharing_modes
    seqs = sm.start([[2, 5, 6, 7, 8, 9, 10], [2, 9, 8]])
    held: list[set[str]] = []
    sm.run_layers(seqs, on_layer=lambda i: held.append(set(seqs[0].shared)))
    stores = [i for i, m in enumerate(modes) if m == "store"]
    assert stores and all(h <= set(cfg.layer_types) for h in held)
    types, n = cfg.layer_types, cfg.num_hidden_layers
    expected = [{types[j] for j in range(i + 1) if modes[j] == "store"} &
                {types[j] for j in range(i + 1, n) if modes[j] == "reuse"} for i in range(n)]
    assert held == expected
    if "reuse" in modes:  # both kinds held from the stores until the last layer of each kind that reads them
        assert held[modes.index("reuse") - 1] == set(types) and held[-1] == set()
    else:
        assert held == [set()] * n
    sm.close()


def test_one_pass_lets_the_ple_projection_go():
    """With no layers to keep (calibration's one pass) the PLE projection is read for each start and let go after
    it (E2B's is 52 MB of float32); where layers are kept (generation) it stays. The results are the same."""
    seqs = [[2, 5, 6, 7, 8, 9], [2, 9, 8, 7]]
    one, kept = (StreamedModel(get_variant("tiny-e2b").local_dir, keep_bytes=k) for k in (0, 1 << 30))
    try:
        for _ in range(2):
            a, b = one.final_hidden(seqs), kept.final_hidden(seqs)
            assert one.shell.per_layer_model_projection.weight.device.type == "meta"
            assert kept.shell.per_layer_model_projection.weight.device.type == "cpu"
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x.numpy(), y.numpy())
    finally:
        one.close()
        kept.close()


def test_streaming_shares_tables_and_pools_only_what_the_next_layers_use(monkeypatch):
    """Fresh sequences of one length share their positions, masks and rotary tables (read-only to the layers: a
    sequence's result is the same run alone), and released layer memory is pooled only in the shapes that the next
    layers load (tiny-e2b's MLPs double in width from layer 4: the narrower ones are let go there, and the wider
    ones once the pass ends, as the next pass begins with narrow layers)."""
    from gemma4_export.validate import streamed

    monkeypatch.setattr(streamed, "POOL_LOOKAHEAD", 3)  # a pass then begins with 3 narrow layers
    sm = StreamedModel(get_variant("tiny-e2b").local_dir, keep_bytes=0)
    pooled: list[tuple[int, dict]] = []
    load = sm.layer

    def spy(i):
        layer = load(i)
        pooled.append((i, {shape: len(free) for shape, free in sm._pool.items()}))
        return layer
    sm.layer = spy
    loading: list[tuple[int, dict]] = []
    load_weights = sm._load

    def spy_load(module, names, bid=None):
        if bid is not None:  # a decoder layer: what the pool holds as its weights are read
            loading.append((bid, {shape: len(free) for shape, free in sm._pool.items()}))
        return load_weights(module, names, bid)
    sm._load = spy_load
    a, b, c = [2, 5, 6, 7, 8, 9], [2, 9, 8, 7, 6, 5], [2, 5, 6]
    try:
        seqs = sm.start([a, b, c])
        assert seqs[0].rotary is seqs[1].rotary and seqs[0].masks is seqs[1].masks
        assert seqs[0].positions is seqs[1].positions and seqs[2].rotary is not seqs[0].rotary
        sm.run_layers(seqs)
        first = [sm._shapes(j) for j in range(streamed.POOL_LOOKAHEAD)]
        assert sm._pool and all(len(free) <= max(s.count(shape) for s in first) for shape, free in sm._pool.items())
        wide = set(sm._shapes(sm.config.num_hidden_layers - 1)) - set(sm._shapes(0))
        assert wide and not wide & set(sm._pool)
        alone = sm.final_hidden([b])[0]
        assert np.array_equal(seqs[1].hidden[0].numpy(), alone.numpy())
        n = sm.config.num_hidden_layers
        for i, pool in pooled:
            ahead = [sm._shapes(j) for j in range(i + 1, min(n, i + 1 + streamed.POOL_LOOKAHEAD))]
            for shape, count in pool.items():
                assert count <= max([s.count(shape) for s in ahead], default=0), (i, shape)
        for i, pool in loading:  # trimmed before the load too: the first wide layer does not load beside narrow MLPs
            ahead = [sm._shapes(j) for j in range(i, min(n, i + streamed.POOL_LOOKAHEAD))]
            for shape, count in pool.items():
                assert count <= max(s.count(shape) for s in ahead), (i, shape)
        assert any(pool for _, pool in loading)
        gone = set(sm._shapes(0)) - {s for j in range(5, n) for s in sm._shapes(j)}  # K/V of a sliding layer
        assert gone and not gone & {s for i, p in pooled if i >= 4 for s in p}
        assert any(pool for _, pool in pooled)  # the pool is used at all
    finally:
        sm.close()


def test_keeping_layers_changes_nothing_but_reads():
    d = get_variant("tiny-26b-a4b").local_dir
    seqs = [[2, 5, 6, 7, 8, 9]]
    out = []
    for keep in (0, 1 << 30):
        sm = StreamedModel(d, keep_bytes=keep)
        try:
            sm.final_hidden(seqs)
            out.append((sm.logits(sm.final_hidden(seqs)[0]), sm.layers_read))
        finally:
            sm.close()
    assert np.array_equal(out[0][0], out[1][0])
    assert out[0][1] == 12 and out[1][1] == 6  # 6 layers, read twice streamed, once kept


def _full_and_compact(data: ReferenceData, whole: WholeModelReference, art) -> tuple[float, float, dict, dict]:
    full, comp = TokenStats.empty(), TokenStats.empty()
    for w, win in enumerate(data.windows):
        a = art.logits(win.ids)[win.half:-1]
        targets = np.asarray(win.ids[win.half + 1:])
        full.add(whole.logits(win.ids)[win.half:-1], a, targets)
        comp.add_compact(data.compact(w), a, targets)
    f, c = summarize(full), summarize(comp)
    return f.kld_mean, c.kld_mean, vars(f), vars(c)


@pytest.mark.parametrize("variant", TINY)
def test_compact_kld_within_two_percent_of_full_vocabulary(variant, whole, computed, tmp_path):
    pytest.importorskip("llama_cpp")
    from gemma4_export.validate.llamacpp import LlamaCppRunner

    data, ref = computed(variant), whole(variant)
    for preset in ("q4_0", "q8_0"):  # 4 and 8 bits
        r = api.export("gguf", variant, preset, tmp_path)
        runner = LlamaCppRunner(r.path, n_ctx=512)
        try:
            kf, kc, f, c = _full_and_compact(data, ref, runner)
        finally:
            runner.close()
        print(f"\n{variant} {preset}: full-vocabulary KLD {kf:.6g}, compact {kc:.6g} ({(kc - kf) / kf:+.3%})")
        assert kc <= kf * (1 + 1e-9) and kc >= 0.98 * kf
        for k in ("top1_agreement", "ppl_ref", "ppl_artifact", "ppl_ratio", "tokens"):  # exact
            assert c[k] == pytest.approx(f[k], rel=1e-6), k


def test_stored_reference_round_trip_and_refusals(computed, tmp_path):
    pytest.importorskip("llama_cpp")
    data = computed("tiny-e2b")
    src = ModelSource.open("tiny-e2b", need_weights=True)
    out = data.save(tmp_path / "ref", tokenizer_from=src.directory)
    again = ReferenceData.load(out)
    assert again.meta == json.loads(json.dumps(data.meta))
    for k, v in data.arrays.items():
        assert np.array_equal(v, again.arrays[k]), k
    assert again.decode(data.generations[0].tokens) == data.decode(data.generations[0].tokens)
    with pytest.raises(Gemma4ExportError, match="exists"):
        data.save(out)

    r = api.export("gguf", "tiny-e2b", "q8_0", tmp_path / "art")
    live = api.validate(r.path, write=False, reference=data)
    stored = api.validate(r.path, write=False, reference=out)
    assert stored.passed == live.passed and stored.logits == live.logits
    assert stored.generation.exact_match_rate == live.generation.exact_match_rate
    assert stored.reference["stored"] == "ref"

    # a reference of other weights is refused: the artifact records the digest of the checkpoint it came from
    other = ReferenceData.load(out)
    other.meta["source_digest"] = "sha256:" + "0" * 64
    with pytest.raises(ReferenceMismatch, match="other weights"):
        api.validate(r.path, write=False, reference=other)
    other = computed("tiny-31b")
    with pytest.raises(ReferenceMismatch):
        api.validate(r.path, write=False, reference=other)
    # it cannot answer for another evaluation than the one it holds
    with pytest.raises(ReferenceMismatch, match="windows"):
        api.validate(r.path, write=False, reference=out, windows=5)
    # damaged or foreign directories get a clear error
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "logprobs.npz").write_bytes(b"not an npz")
    with pytest.raises(Gemma4ExportError, match="damaged reference"):
        ReferenceData.load(bad)
    with pytest.raises(Gemma4ExportError, match="not a reference directory"):
        ReferenceData.load(tmp_path / "art")


def test_live_validation_refuses_an_artifact_of_other_weights(tmp_path):
    pytest.importorskip("llama_cpp")
    r = api.export("gguf", "tiny-e2b", "q8_0", tmp_path)
    ft = get_variant("tiny-e2b").local_dir
    copy = tmp_path / "copy"
    shutil.copytree(ft, copy)
    rep = api.validate(r.path, model_dir=copy, write=False, windows=1, prompts=1, new_tokens=8)  # same bytes: fine
    assert rep.logits.tokens > 0
    cfg = json.loads((copy / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 2e-6  # other weights/config: another checkpoint
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReferenceMismatch, match="other weights"):
        api.validate(r.path, model_dir=copy, write=False, windows=1, prompts=1, new_tokens=8)


CHURN = """
import sys
import torch

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) >> 10

if sys.argv[1] == "streamed":
    from gemma4_export.validate.streamed import StreamedModel
    StreamedModel(sys.argv[2], keep_bytes=0).close()
w = torch.ones(1 << 20)  # 4 MB, freed: glibc's own threshold grows past it
del w
big, small = [], []
for _ in range(64):  # 256 MB of 4 MB tensors, as a layer's activations, each followed by one that lives on
    big.append(torch.ones(1 << 20))
    small.append(torch.ones(50_000))
before = rss()
del big
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator")
def test_streamed_model_gives_freed_tensor_memory_back():
    """The streamed model's tensors of 1-32 MB (hidden states, masks, activations) are freed and made anew at every
    layer; under glibc's growing threshold they came from heaps that keep what was freed below a live allocation.
    Once a StreamedModel exists, freed 4 MB tensors go back to the system."""
    ck = str(get_variant("tiny-e2b").local_dir)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    back = {mode: int(subprocess.run([sys.executable, "-c", CHURN, mode, ck], capture_output=True, text=True,
                                     check=True, env=env).stdout.split()[-1]) for mode in ("plain", "streamed")}
    assert back["plain"] < 64  # the heap kept the 256 MB: what the model's setting is for
    assert back["streamed"] >= 200, back


def test_a_tokenizer_without_a_chat_template_gets_plain_prompts(tmp_path):
    """A tokenizer saved without a chat template (a base model's, a raw-text fine-tune's): the greedy prompts are the
    plain text after BOS, said in the reference's meta, and an artifact validates against them (it used to stop in
    transformers' apply_chat_template)."""
    import transformers

    from layouts import without_chat_template

    pytest.importorskip("llama_cpp")
    d = without_chat_template("tiny-31b", tmp_path / "ck")
    assert not transformers.AutoTokenizer.from_pretrained(d).chat_template

    ref = api.reference(model_dir=d, windows=1, prompts=2, new_tokens=64)  # the f32 thresholds ask for 64
    assert ref.meta["prompt_format"].startswith("plain text")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    bos = ModelSource.open(model_dir=d).arch.bos_token_id
    assert [g.ids for g in ref.generations] == [[bos] + tok.encode(g.prompt, add_special_tokens=False)
                                                for g in ref.generations]
    r = api.export("gguf", model_dir=d, preset="f32", out=tmp_path / "out", towers=False)
    rep = api.validate(r.path, model_dir=d, write=False, reference=ref)
    assert rep.passed and rep.generation.exact_match_rate == 1.0

    # with the template, the prompts are the template's rendering, as before
    with_template = api.reference(variant="tiny-31b", windows=1, prompts=2, new_tokens=8)
    assert with_template.meta["prompt_format"] == "chat template"
    assert all(g.ids != [bos] + tok.encode(g.prompt, add_special_tokens=False) for g in with_template.generations)
