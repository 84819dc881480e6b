"""The media-prompted generations' reference without the whole model: StreamedMediaReference (towers alone, the
text model streamed one layer at a time) gives transformers' whole-model tokens and margins, and `validate` uses it
where the whole model in fp32 would not fit."""

import numpy as np
import pytest
import transformers

from gemma4_export import api
from gemma4_export.exporter.arch import load_config
from gemma4_export.exporter.variants import TINY_DIR
from gemma4_export.validate import harness
from gemma4_export.validate import towers as vt


def _cases():
    out = []
    for name in ("tiny-e2b", "tiny-31b", "tiny-26b-a4b", "tiny-12b"):
        cfg = load_config(TINY_DIR / name)
        out += [(name, "image")] + ([(name, "audio")] if cfg.get("audio_config") else [])
    return out


@pytest.mark.parametrize("name, kind", _cases())
def test_streamed_media_reference_is_transformers(name, kind):
    """Same 16 tokens and the same top-2 margins (measured within 1.3e-6; with plain causal masks instead of the
    models' image blocks, the margins of tiny-31b, tiny-26b-a4b and tiny-12b move by 0.010-0.019): the placeholders
    looked up as the pad token, the soft tokens merged in, the image masks as each model's forward builds them."""
    d = TINY_DIR / name
    tok = transformers.AutoTokenizer.from_pretrained(d)
    towers = vt.TowerReference(d)
    cfg = load_config(d)
    if kind == "image":
        media = vt.test_image(*vt.image_size_for(towers.config.vision_config.to_dict()))
        feats = {cfg["image_token_id"]: towers.image_features(*vt.image_patches(media, towers.patch_size))}
    else:
        media = vt.test_audio(2.0)
        feats = {cfg["audio_token_id"]: towers.audio_features(*vt.audio_features(media, d))}
    ids = vt.media_prompt_ids(lambda t: tok.encode(t, add_special_tokens=False), cfg, kind,
                              len(next(iter(feats.values()))))
    want, want_margins = vt.MediaReference(d).greedy(ids, 16, **{kind: media})
    got, got_margins = vt.StreamedMediaReference(d).greedy(ids, 16, feats)
    assert got == want
    assert np.max(np.abs(np.array(got_margins) - np.array(want_margins))) < 1e-4


def test_validate_streams_the_media_reference_where_the_model_does_not_fit(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    r = api.export("gguf", variant="tiny-e2b", preset="f32", out=tmp_path)
    monkeypatch.setattr(harness, "WHOLE_MODEL_MEMORY_SHARE", 0.0)
    rep = api.validate(r.path, variant="tiny-e2b", prompts=2, windows=2)
    assert rep.passed, rep.failures
    for kind in ("image", "audio"):
        g = rep.checks[f"{kind}_generation"]
        assert g["gated"] and g["exact"] and "reference streamed" in g["summary"], g
