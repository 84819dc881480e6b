import json

import pytest

from gemma4_export import api
from gemma4_export.errors import QuantError
from gemma4_export.exporter.tensors import MATRIX_ROLES
from gemma4_export.quant.presets import PRESETS, presets_of
from gemma4_export.quant.rules import use_more_bits
from conftest import REAL

GGUF_PRESETS = presets_of("gguf")


@pytest.mark.parametrize("preset", GGUF_PRESETS)
@pytest.mark.parametrize("variant", REAL)
def test_gemma4_rules_hold(variant, preset):
    plan = api.plan(variant, preset=preset)
    for e in plan.entries:
        if e.role in ("norm", "layer_scalar", "router_proj", "router_scale", "router_expert_scale"):
            assert e.type == "F32", e
        if e.role in ("tower", "kv_shared_unused"):
            assert e.type == "DROP" and e.bytes == 0, e
        if e.role in ("ple_gate", "ple_proj"):
            assert e.type == {"f32": "F32", "bf16": "BF16", "f16": "F16"}.get(preset, "Q8_0"), e
        if e.role == "ple_model_proj":
            assert e.type == {"f32": "F32", "f16": "F16"}.get(preset, "BF16"), e
        if e.role == "ple_table":
            assert e.type == PRESETS[("gguf", preset)].ple_table
    kept = plan.kept
    assert all(e.bytes > 0 for e in kept)
    assert plan.total_bytes == sum(e.bytes for e in kept)


def test_plan_json_shape():
    d = api.plan("26b-a4b", preset="q4_k_m").to_json()
    assert d["total_bytes"] > 0 and isinstance(d["tensors"], list)
    assert set(d["tensors"][0]) == {"name", "shape", "role", "type", "bytes", "reason"}
    json.dumps(d)
    roles = {t["role"] for t in d["tensors"]}
    assert {"router_proj", "expert_gate_up", "expert_down", "tower"} <= roles


def test_k_eq_v_key_gets_value_bits():
    """On a K==V full layer the key projection is the value projection, so the K-quant mix bumps it like attn_v."""
    plan = api.plan("31b", preset="q4_k_m")
    by = plan.by_name()
    k5 = by["model.language_model.layers.5.self_attn.k_proj.weight"]  # full layer 5, first eighth of 60 layers
    assert use_more_bits(5, 60) and k5.type == "Q6_K" and k5.rule == "more-bits"
    k4 = by["model.language_model.layers.4.self_attn.k_proj.weight"]  # sliding layer: has its own v_proj
    assert k4.type == "Q4_K"


def test_fallback_is_stated_not_silent():
    """26B-A4B's expert down rows (704) and dense down rows (2112) do not fit 256-blocks: the plan says so."""
    by = api.plan("26b-a4b", preset="q4_k_m").by_name()
    e = by["model.language_model.layers.10.experts.down_proj"]
    assert e.type == "Q5_0" and "fallback" in e.rule and "rows here are 704" in e.reason
    e = by["model.language_model.layers.0.experts.down_proj"]
    assert e.type == "Q8_0" and "fallback" in e.rule  # more-bits Q6_K -> Q8_0


def test_ple_type_override():
    plan = api.plan("e2b", preset="q4_k_m", ple_type="q8_0")
    e = plan.by_name()["model.language_model.embed_tokens_per_layer.weight"]
    assert e.type == "Q8_0" and e.rule == "ple-table"
    assert plan.total_bytes > api.plan("e2b", preset="q4_k_m").total_bytes


def test_tensor_type_override():
    plan = api.plan("e2b", preset="q4_k_m", overrides=[r"layers\.3\.self_attn\.q_proj=Q8_0"])
    e = plan.by_name()["model.language_model.layers.3.self_attn.q_proj.weight"]
    assert e.type == "Q8_0" and e.rule == "override"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preset="q3_xs"), "unknown gguf preset 'q3_xs'"),
        (dict(overrides=["q_proj=Q9_9"]), "unknown tensor type 'Q9_9'"),
        (dict(overrides=["no_such_tensor=Q8_0"]), "matched no kept tensor"),
        (dict(overrides=["q_proj"]), "expected PATTERN=TYPE"),
        (dict(overrides=["input_layernorm=Q8_0"]), "is 1-D"),
        (dict(overrides=["vision_tower=Q8_0"]), "matched no kept tensor"),
        (dict(ple_type="q4_k", variant="31b"), "has no per-layer embedding table"),
    ],
)
def test_impossible_choices(kwargs, message):
    kw = dict(variant="e2b", preset="q4_k_m") | kwargs
    with pytest.raises(QuantError, match=message):
        api.plan(**kw)


def test_router_cannot_be_quantized():
    with pytest.raises(QuantError, match="router stays at full precision"):
        api.plan("26b-a4b", preset="q4_k_m", overrides=["router.proj=Q8_0"])


def test_row_length_checked_for_overrides():
    with pytest.raises(QuantError, match="not a multiple of Q4_K"):
        api.plan("26b-a4b", preset="q8_0", overrides=["experts.down_proj=Q4_K"])


def test_every_matrix_role_has_a_rule():
    """Coverage guard: every quantizable role reaches a rule in every preset of every target (no silent default).
    The published variants tie their head; an untied one (a fine-tune saved with tie_word_embeddings false) adds
    the output head's role."""
    import dataclasses

    from gemma4_export.exporter.tensors import expected_text_tensors
    from gemma4_export.exporter.variants import get_variant
    from gemma4_export.quant.plan import build_plan

    untied = dataclasses.replace(get_variant("e2b").arch(), tie_word_embeddings=False)
    for (target, preset), p in PRESETS.items():
        roles = {e.role for v in REAL for e in api.plan(v, target, preset).entries}
        plan = build_plan(untied, expected_text_tensors(untied), p, "e2b-untied")
        roles |= {e.role for e in plan.entries}
        assert {r.value for r in MATRIX_ROLES} <= roles, (target, preset)
        head = next(e for e in plan.entries if e.role == "output")
        assert head.rule == "output-head" and head.type == p.embed
