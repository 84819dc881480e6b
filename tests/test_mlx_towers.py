"""The MLX directory with its towers: mlx-vlm loads it whole (text quantized as the plan says, towers unquantized),
its image and audio features match transformers' fp32 towers, a greedy generation from an image prompt matches
transformers' Gemma4ForConditionalGeneration, and mlx-lm still loads it and generates exactly what it did before.

Measured on the tiny checkpoints (mlx 0.32.4, mlx-vlm 0.7.10, transformers 5.24, CPU), against validate/towers.py's
fp32 reference (e2b / 31b):
  image features, tower weights widened to float32: cosine 1 - 1e-14, relative error 2.2e-7 / 2.2e-7
  image features, bf16 as mlx-vlm runs them:        cosine 0.999994, relative error 3.6e-3 / 3.5e-3
  the same for the published 26B/31B vision settings (no clipped linears, standardized): 2.3e-7, 4.4e-3
  audio features (e2b, 50 tokens), float32 / bf16:  relative error 5.5e-7 / 1.1e-5 (the audio tower computes in
                                                    float32 when its input is float32, whatever its weights)
  another image's features differ from these by 0.17.
A 32-token greedy generation from the image prompt, mlx-vlm vs transformers' fp32 model:
  bf16 text: 32/32 tokens agree (both); logits over the generated steps: relative error 0.0052 / 0.0039 (another
             image: 0.019 / 0.014)
  4-bit text (the plan, 8-bit head), quantized matmuls summing in float32 as on Metal: the first divergence at
             token 0 / 14, where transformers' own margin is 0.037 / 0.020 logits; teacher-forced 29/32 / 32/32
             (transformers' margins at the misses at most 0.099); logits relative error 0.022 / 0.023. With mlx's
             CPU sums (bf16) tiny-31b misses one teacher-forced token by a margin of 0.42: the head's arithmetic.
The bounds below are those numbers with a margin.

The tiny audio towers take 128 mel bins, as every published one does and as mlx-vlm's tower is built for; a
checkpoint whose tower takes another width gets no audio tower in mlx-vlm (add_towers' default, tested on a copy).
"""

import contextlib
import json

import numpy as np
import pytest

pytest.importorskip("mlx_vlm")

from gemma4_export import api  # noqa: E402
from gemma4_export.exporter.variants import VARIANTS  # noqa: E402
from gemma4_export.targets.mlx_towers import (  # noqa: E402
    TOWERS_SHARD,
    MLXTowersError,
    add_towers,
    load_vlm,
    load_vlm_processor,
    mlx_vlm_audio_features,
    mlx_vlm_features,
)
from gemma4_export.validate.mlxrt import check_safetensors, float32_sums  # noqa: E402
from gemma4_export.validate.towers import (  # noqa: E402
    TowerReference,
    audio_features,
    image_patches,
    image_size_for,
)
from gemma4_export.validate.towers import test_audio as make_audio  # noqa: E402 (not a test: renamed for pytest)
from gemma4_export.validate.towers import test_image as make_image  # noqa: E402

VARIANTS_WITH_TOWERS = ["tiny-e2b", "tiny-31b"]
# features vs the fp32 reference: (min cosine, max relative error)
FEATURE_BOUNDS = {"float32": (1 - 1e-9, 1e-5), "native": (0.9999, 2e-2)}
# image-prompt logits vs transformers fp32, over the generated steps: max relative error, by text preset
LOGIT_BOUNDS = {"bf16": 0.02, "4bit": 0.1}
NEAR_TIE = 0.25  # logits: a greedy choice that differs where transformers' own top two are this close is a tie
N_NEW = 32


def _cos_rel(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ckpt(variant: str):
    return VARIANTS[variant].local_dir


def _load(directory):
    return load_vlm(directory)


def _lm_run(directory, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """mlx-lm: greedy tokens through its generate path, and the prompt's logits."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(directory))
    toks = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=16)]
    return toks, np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _image(variant: str, seed: int = 0):
    vc = json.loads((_ckpt(variant) / "config.json").read_text())["vision_config"]
    h, w = image_size_for(vc)
    return image_patches(make_image(h, w, seed=seed), vc["patch_size"])


TEXT_IDS = [2, 40, 41, 50, 60, 70, 80, 90]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(variant, preset) -> the exported directory with towers, and mlx-lm's run before they were added."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("mlx_towers")

    def get(variant: str, preset: str):
        if (variant, preset) not in cache:
            r = api.export("mlx", variant=variant, preset=preset, out=root, force=True, calibrate=False,
                           towers=False)
            before = _lm_run(r.path, TEXT_IDS)
            result = add_towers(_ckpt(variant), r.path)
            cache[variant, preset] = r.path, result, before
        return cache[variant, preset]

    return get


@pytest.fixture(scope="module")
def vlm(built):
    cache: dict = {}

    def get(variant: str, preset: str):
        if (variant, preset) not in cache:
            d, result, _ = built(variant, preset)
            cache[variant, preset] = _load(d)
        return cache[variant, preset]

    return get


@pytest.fixture(scope="module")
def reference():
    cache: dict = {}

    def get(variant: str) -> TowerReference:
        if variant not in cache:
            cache[variant] = TowerReference(_ckpt(variant))
        return cache[variant]

    return get


# ---- the files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS_WITH_TOWERS)
def test_directory_carries_towers(variant, built, tmp_path):
    from safetensors import safe_open

    d, result, _ = built(variant, "4bit")
    ck = _ckpt(variant)
    src = json.loads((ck / "config.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    check_safetensors(d)  # every shard valid, and the index lists exactly their tensors
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    towers = sorted(k for k, v in wm.items() if v == TOWERS_SHARD)
    assert towers and all(k.split(".")[0] in ("vision_tower", "embed_vision", "audio_tower", "embed_audio")
                          for k in towers)
    assert not any(k.endswith((".scales", ".biases")) for k in towers), "the towers stay unquantized"
    assert all(not k.startswith(("vision_tower", "audio_tower", "embed_")) for k, v in wm.items() if v != TOWERS_SHARD)
    with safe_open(str(d / TOWERS_SHARD), framework="numpy") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}  # the checkpoint's dtype
    assert result["dtypes"] == ["BF16"] and result["tensors"] == len(towers)

    # configs as the checkpoint has them, the media token ids, the processor file
    assert cfg["vision_config"] == src["vision_config"]
    assert cfg["audio_config"] == src.get("audio_config")
    for k in ("boi_token_id", "image_token_id", "eoi_token_id"):
        assert cfg[k] == src[k]
    assert (cfg["image_token_id"], cfg["boi_token_id"], cfg["eoi_token_id"]) == (1019, 1017, 1021)
    assert (d / "processor_config.json").read_bytes() == (ck / "processor_config.json").read_bytes()
    assert cfg["gemma4_export"]["towers"]["tensors"] == len(towers)
    assert "language_model.model.layers.0.self_attn.q_proj" in cfg["quantization"]

    if variant == "tiny-e2b":  # convolutions in MLX's layout: channels last
        with safe_open(str(d / TOWERS_SHARD), framework="numpy") as st:
            assert st.get_slice("audio_tower.subsample_conv_projection.layer0.conv.weight").get_shape() == [128, 3, 3, 1]
            assert st.get_slice("audio_tower.subsample_conv_projection.layer1.conv.weight").get_shape() == [8, 3, 3, 128]
            assert st.get_slice("audio_tower.layers.0.lconv1d.depthwise_conv1d.weight").get_shape() == [64, 5, 1]

    # a second run writes the same bytes, and leaves no temporary file
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    again = add_towers(ck, d, audio=True)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    assert again["tensors"] == result["tensors"]


def test_default_leaves_out_an_audio_tower_mlx_vlm_cannot_build(tmp_path):
    """An audio tower of another input width than mlx-vlm's 128 mel bins (a copy of tiny-e2b whose tower takes 16):
    left out by default (with the reason), and unpatched mlx-vlm loads the rest strictly, with no audio tower."""
    import shutil

    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ckpt"
    shutil.copytree(_ckpt("tiny-e2b"), ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["audio_config"]["subsampling_conv_channels"] = [16, 8]
    (ck / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    audio = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**cfg).audio_config)
    sd = load_file(str(ck / "model.safetensors"))
    sd.update({f"model.audio_tower.{k}": v.to(torch.bfloat16).contiguous() for k, v in audio.state_dict().items()
               if f"model.audio_tower.{k}" in sd})
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    r = api.export("mlx", model_dir=ck, preset="4bit", out=tmp_path, force=True, calibrate=False, towers=False)
    result = add_towers(ck, r.path)
    assert "128 mel bins" in result["audio_skipped"]
    assert result["modules"] == ["embed_vision", "vision_tower"]
    cfg = json.loads((r.path / "config.json").read_text())
    assert cfg["audio_config"] is None and cfg["vision_config"]
    check_safetensors(r.path)
    model = load_vlm(r.path)
    assert model.audio_tower is None and model.vision_tower is not None
    assert add_towers(ck, r.path, audio=False)["audio_skipped"] == "not asked for"
    wm = json.loads((r.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith(("audio_tower", "embed_audio")) for k in wm)
    check_safetensors(r.path)


def test_export_writes_the_towers(tmp_path):
    """`gemma4-export mlx` writes them by default (the tower plan's types: bf16, as stored), --text-only not."""
    r = api.export("mlx", variant="tiny-e2b", preset="4bit", out=tmp_path, calibrate=False)
    assert r.tower_plan is not None and {e.type for e in r.tower_plan.kept} == {"BF16"}
    cfg = json.loads((r.path / "config.json").read_text())
    assert cfg["gemma4_export"]["towers"]["modules"] == ["audio_tower", "embed_audio", "embed_vision", "vision_tower"]
    assert (r.path / TOWERS_SHARD).is_file()
    t = api.export("mlx", variant="tiny-e2b", preset="8bit", out=tmp_path, calibrate=False, towers=False)
    assert not (t.path / TOWERS_SHARD).exists() and "vision_config" not in json.loads((t.path / "config.json").read_text())


def test_refusals(tmp_path):
    r = api.export("mlx", variant="tiny-31b", preset="4bit", out=tmp_path, force=True, calibrate=False)
    with pytest.raises(MLXTowersError, match="not exported from this checkpoint"):
        add_towers(_ckpt("tiny-e2b"), r.path)  # another checkpoint's towers
    with pytest.raises(MLXTowersError, match="not an MLX directory"):
        add_towers(_ckpt("tiny-31b"), tmp_path)


# ---- mlx-lm: unchanged --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS_WITH_TOWERS)
def test_mlx_lm_unchanged(variant, built):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    d, _, (tokens, logits) = built(variant, "4bit")
    after_tokens, after_logits = _lm_run(d, TEXT_IDS)
    assert after_tokens == tokens
    assert np.array_equal(after_logits, logits)
    # mlx-lm's own sanitize discards every tower tensor
    model, _ = load(str(d))
    towers = mx.load(str(d / TOWERS_SHARD))
    assert towers and model.sanitize(towers) == {}
    assert not any(k.startswith(("vision_tower", "audio_tower", "embed_")) for k, _ in tree_flatten(model.parameters()))


# ---- mlx-vlm: the towers' features ---------------------------------------------------------------------------------


def test_mlx_vlm_quantizes_the_text_only(vlm, built):
    import mlx.core as mx
    import mlx.nn as nn

    d, _, _ = built("tiny-31b", "4bit")
    model = vlm("tiny-31b", "4bit")
    q = json.loads((d / "config.json").read_text())["quantization"]
    planned = {k for k, v in q.items() if isinstance(v, dict)}
    got = {p for p, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert got == planned
    assert not any(p.startswith(("vision_tower", "embed_vision")) for p in got)
    assert model.vision_tower.patch_embedder.input_proj.weight.dtype == mx.bfloat16


@pytest.mark.parametrize("variant", VARIANTS_WITH_TOWERS)
@pytest.mark.parametrize("dtype", ["float32", "native"])
def test_image_features(variant, dtype, vlm, reference):
    pv, pos = _image(variant)
    want = reference(variant).image_features(pv, pos)
    got = mlx_vlm_features(vlm(variant, "4bit"), pv, pos, dtype=dtype)
    assert got.shape == want.shape == (70, 256)
    cos, rel = _cos_rel(got, want)
    print(f"{variant} image features ({dtype}): cosine {cos:.9f}, relative error {rel:.2e}")
    min_cos, max_rel = FEATURE_BOUNDS[dtype]
    assert cos >= min_cos and rel <= max_rel, (cos, rel)
    # another image's features are well beyond even the bf16 bound (measured 0.17): the comparison sees the image
    other = reference(variant).image_features(*_image(variant, seed=1))
    assert _cos_rel(got, other)[1] > 5 * FEATURE_BOUNDS["native"][1]


@pytest.mark.parametrize("dtype", ["float32", "native"])
def test_audio_features(dtype, vlm, reference):
    ck = _ckpt("tiny-e2b")
    feats, mask = audio_features(make_audio(), ck)
    want = reference("tiny-e2b").audio_features(feats, mask)
    got = mlx_vlm_audio_features(vlm("tiny-e2b", "4bit"), feats, mask, dtype=dtype)
    assert got.shape == want.shape and got.shape[0] > 0
    cos, rel = _cos_rel(got, want)
    print(f"tiny-e2b audio features ({dtype}): {got.shape[0]} tokens, cosine {cos:.9f}, relative error {rel:.2e}")
    min_cos, max_rel = FEATURE_BOUNDS[dtype]
    assert cos >= min_cos and rel <= max_rel, (cos, rel)


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")  # tiny-31b's default extractor
def test_mlx_vlm_load_with_processor(built):
    """mlx_vlm.load (model and processor, remote code refused): the processor expands an image into as many
    placeholder tokens as the model's vision tower makes soft tokens from its pixels."""
    import mlx.core as mx
    from PIL import Image

    d, _, _ = built("tiny-31b", "4bit")
    model, processor = load_vlm_processor(d)
    out = processor(text=["look <|image|> here"], images=[Image.fromarray(make_image(336, 480))], return_tensors="np")
    ids = np.asarray(out["input_ids"])[0]
    n = int((ids == 1019).sum())
    feats = model.encode_image(mx.array(np.asarray(out["pixel_values"], dtype=np.float32)))
    assert n > 0 and feats.shape[1] == n
    at = np.flatnonzero(ids == 1019)
    assert ids[at[0] - 1] == 1017 and ids[at[-1] + 1] == 1021 and len(at) == at[-1] - at[0] + 1


# ---- a greedy generation from an image prompt, mlx-vlm vs transformers -------------------------------------------


@pytest.fixture(scope="module")
def hf_run():
    """transformers' Gemma4ForConditionalGeneration in fp32: greedy tokens from the image prompt, and the logits over
    prompt + those tokens (for the same image, and for another image)."""
    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            import torch
            import transformers

            ck = _ckpt(variant)
            cfg = json.loads((ck / "config.json").read_text())
            pv, pos = _image(variant)
            n_img = pv.shape[1] // cfg["vision_config"]["pooling_kernel_size"] ** 2
            prompt = TEXT_IDS[:3] + [cfg["boi_token_id"]] + [cfg["image_token_id"]] * n_img + [cfg["eoi_token_id"]] \
                + TEXT_IDS[3:]
            model = transformers.Gemma4ForConditionalGeneration.from_pretrained(ck, dtype=torch.float32).eval()

            def mm(ids):
                return torch.tensor([[1 if t == cfg["image_token_id"] else 0 for t in ids]])

            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                                  dtype=torch.long),
                                     pixel_values=torch.from_numpy(pv), image_position_ids=torch.from_numpy(pos),
                                     mm_token_type_ids=mm(prompt), max_new_tokens=N_NEW, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
                tokens = out[0, len(prompt):].tolist()
                full = prompt + tokens
                logits = model(input_ids=torch.tensor([full]), pixel_values=torch.from_numpy(pv),
                               image_position_ids=torch.from_numpy(pos), mm_token_type_ids=mm(full)).logits[0].numpy()
            cache[variant] = dict(prompt=prompt, tokens=tokens, full=full, logits=logits, pv=pv, pos=pos,
                                  image_token=cfg["image_token_id"])
        return cache[variant]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS_WITH_TOWERS)
@pytest.mark.parametrize("preset", ["bf16", "4bit"])
def test_image_prompt_generation(variant, preset, vlm, hf_run):
    import mlx.core as mx

    ref = hf_run(variant)
    model = vlm(variant, preset)
    # 4-bit text with its 8-bit head: quantized matmuls sum in float32, as mlx's Metal kernels do; mlx's CPU kernels
    # sum in bf16, hundreds of roundings per logit of the 262,144-row head on a real model (validate/mlxrt.py)
    with float32_sums(mx) if preset != "bf16" else contextlib.nullcontext():
        _image_prompt_generation(variant, preset, model, ref)


def _image_prompt_generation(variant, preset, model, ref):
    import mlx.core as mx
    from mlx_vlm.generate.ar import generate_step

    prompt, hf_tokens, hf_logits = ref["prompt"], ref["tokens"], ref["logits"]
    pv, pos = mx.array(ref["pv"]), mx.array(ref["pos"].astype(np.int32))

    def mm(ids):
        return mx.array([[1 if t == ref["image_token"] else 0 for t in ids]])

    # free-running greedy through mlx-vlm's own generate path
    tokens = [int(t) for t, _ in generate_step(mx.array([prompt]), model, pv, None, max_tokens=N_NEW, temperature=0.0,
                                               image_position_ids=pos, mm_token_type_ids=mm(prompt))]
    first = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), N_NEW)
    # teacher-forced: mlx-vlm's logits over transformers' sequence
    P = len(prompt) - 1
    rows = slice(P, P + N_NEW)

    def logits(pixels):
        out = model(mx.array([ref["full"]]), pixels, image_position_ids=pos, mm_token_type_ids=mm(ref["full"]))
        return np.array(out.logits[0].astype(mx.float32))

    got = logits(pv)
    mine, theirs = got[rows].argmax(-1), hf_logits[rows].argmax(-1)
    misses = [float(hf_logits[P + i, theirs[i]] - hf_logits[P + i, mine[i]])
              for i in range(N_NEW) if mine[i] != theirs[i]]
    rel = _cos_rel(got[rows], hf_logits[rows])[1]
    print(f"{variant} {preset}: free-running {sum(a == b for a, b in zip(tokens, hf_tokens))}/{N_NEW} tokens agree, "
          f"first divergence at {first}; teacher-forced {N_NEW - len(misses)}/{N_NEW} agree, transformers' margins at "
          f"the misses {[round(m, 3) for m in misses]}; logits relative error {rel:.4f}")

    assert rel <= LOGIT_BOUNDS[preset], rel
    assert all(m <= NEAR_TIE for m in misses), misses
    assert N_NEW - len(misses) >= 0.75 * N_NEW
    if first < N_NEW:  # identical contexts up to here: transformers' logits at this step say whether it is a tie
        margin = float(hf_logits[P + first, hf_tokens[first]] - hf_logits[P + first, tokens[first]])
        print(f"  transformers' margin at the first divergence: {margin:.3f}")
        assert margin <= NEAR_TIE, (first, margin)
    if preset == "bf16":  # text unquantized: the image is what the logits' agreement rests on
        other = _cos_rel(logits(mx.array(_image(variant, seed=1)[0]))[rows], hf_logits[rows])[1]
        print(f"  with another image: logits relative error {other:.4f}")
        assert other > 2.5 * rel


def _standardized_31b(tmp_path):
    """tiny-31b with the published 26B/31B vision settings: no clipped linears, standardized output (std_bias and
    std_scale buffers, set to non-trivial values)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = _ckpt("tiny-31b")
    ck = tmp_path / "tiny-31b-standardized"
    shutil.copytree(src, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["vision_config"].update(use_clipped_linears=False, standardize=True)
    (ck / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = load_file(str(ck / "model.safetensors"))
    sd = {k: v for k, v in sd.items() if not (k.startswith("model.vision_tower.") and k.endswith(
        (".input_min", ".input_max", ".output_min", ".output_max")))}
    g = torch.Generator().manual_seed(0)
    hidden = cfg["vision_config"]["hidden_size"]
    sd["model.vision_tower.std_bias"] = (0.3 * torch.randn(hidden, generator=g)).to(torch.bfloat16)
    sd["model.vision_tower.std_scale"] = (0.5 + torch.rand(hidden, generator=g)).to(torch.bfloat16)
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    return ck


def test_published_large_vision_settings(tmp_path):
    """The 26B/31B vision tower as published (no clipped linears, standardized features), on a tiny-31b copy."""
    ck = _standardized_31b(tmp_path)
    r = api.export("mlx", model_dir=ck, preset="4bit", out=tmp_path / "out", force=True, calibrate=False)
    result = add_towers(ck, r.path)
    wm = json.loads((r.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"vision_tower.std_bias", "vision_tower.std_scale"} <= set(wm)
    assert not any(k.startswith("vision_tower.") and k.endswith("_min") for k in wm)
    assert result["audio_skipped"] is None and result["modules"] == ["embed_vision", "vision_tower"]
    pv, pos = _image("tiny-31b")
    want = TowerReference(ck).image_features(pv, pos)
    model = load_vlm(r.path)
    for dtype in ("float32", "native"):
        cos, rel = _cos_rel(mlx_vlm_features(model, pv, pos, dtype=dtype), want)
        print(f"tiny-31b standardized image features ({dtype}): cosine {cos:.9f}, relative error {rel:.2e}")
        assert cos >= FEATURE_BOUNDS[dtype][0] and rel <= FEATURE_BOUNDS[dtype][1], (dtype, cos, rel)


def test_names_and_layouts():
    from gemma4_export.targets.mlx_towers import tower_layout, tower_name

    vision_clipped = {"vision_config": {"use_clipped_linears": True}, "audio_config": {}}
    plain = {"vision_config": {}, "audio_config": {"subsampling_conv_channels": [128, 32]}}
    clip = "model.vision_tower.encoder.layers.0.mlp.up_proj.input_max"
    assert tower_name(clip, vision_clipped) == clip[len("model."):]
    assert tower_name(clip, plain) is None  # transformers' and mlx-vlm's default: no clipped linears in vision
    audio_clip = "model.audio_tower.layers.0.self_attn.q_proj.input_max"
    assert tower_name(audio_clip, plain) == audio_clip[len("model."):]  # audio's default: clipped
    assert tower_name(audio_clip, vision_clipped) is None  # no audio config: mlx-vlm drops the audio tower
    assert tower_name("model.vision_tower.rotary_emb.inv_freq", plain) is None
    with pytest.raises(MLXTowersError, match="no module"):
        tower_name("model.vision_embedder.proj.weight", plain)
    assert tower_layout("audio_tower.subsample_conv_projection.layer1.conv.weight", (32, 128, 3, 3), plain) == \
        (0, 2, 3, 1)
    assert tower_layout("audio_tower.layers.3.lconv1d.depthwise_conv1d.weight", (1024, 1, 5), plain) == (0, 2, 1)
    assert tower_layout("vision_tower.patch_embedder.position_embedding_table", (2, 10240, 768), plain) is None
    with pytest.raises(MLXTowersError, match="input channels"):
        tower_layout("audio_tower.subsample_conv_projection.layer1.conv.weight", (32, 64, 3, 3), plain)
    with pytest.raises(MLXTowersError, match="no known MLX layout"):
        tower_layout("vision_tower.some_new.conv.weight", (8, 3, 3, 3), plain)
