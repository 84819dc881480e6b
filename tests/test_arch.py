import copy
import json

import pytest

from gemma4_export.errors import ConfigError
from gemma4_export.exporter.arch import FULL, SLIDING, parse_config
from gemma4_export.exporter.variants import get_variant
from conftest import REAL


def to_per_layer_form(cfg: dict) -> dict:
    """Re-serialise a hub-form config as transformers >= 5.2x saves it: global_head_dim and the global KV heads
    move into text_config.per_layer_config."""
    import transformers

    c = transformers.AutoConfig.for_model(**cfg)
    d = json.loads(c.to_json_string(use_diff=False))
    assert "per_layer_config" in d["text_config"]
    assert "global_head_dim" not in d["text_config"]
    return d


@pytest.mark.parametrize("name", REAL)
def test_both_config_forms_give_one_description(name):
    cfg = get_variant(name).config()
    hub = parse_config(cfg)
    resaved = parse_config(to_per_layer_form(cfg))
    assert resaved == hub
    assert hub.global_head_dim == 512 and hub.head_dim == 256


def test_e2b_facts():
    a = get_variant("e2b").arch()
    assert a.num_layers == 35 and a.first_kv_shared_layer == 15
    assert a.layer_types == tuple(([SLIDING] * 4 + [FULL]) * 7)
    # layers 15-34 reuse 13 (sliding) and 14 (full)
    assert {a.kv_donor(i) for i in range(15, 35) if not a.is_full(i)} == {13}
    assert {a.kv_donor(i) for i in range(15, 35) if a.is_full(i)} == {14}
    assert [a.mlp_width(i) for i in (0, 14, 15, 34)] == [6144, 6144, 12288, 12288]
    assert a.ple_dim == 256 and a.final_logit_softcapping == 30.0
    assert a.features() == ["PLE", "KV sharing", "double-wide MLP"]


def test_26b_facts():
    a = get_variant("26b-a4b").arch()
    assert a.moe.num_experts == 128 and a.moe.top_k == 8 and a.moe.intermediate_size == 704
    assert a.k_eq_v and a.num_global_kv_heads == 2 and a.num_kv_heads == 8
    assert not a.has_v_proj(5) and a.has_v_proj(0)
    assert a.layer_kv_heads(5) == 2 and a.layer_head_dim(5) == 512 and a.layer_head_dim(0) == 256


def test_12b_is_unified():
    a = get_variant("12b").arch()
    assert a.family == "gemma4_unified" and a.architecture == "Gemma4UnifiedForConditionalGeneration"
    assert a.num_global_kv_heads == 1 and a.k_eq_v and not a.has_ple


def test_global_kv_heads_ignored_without_k_eq_v():
    cfg = copy.deepcopy(get_variant("e4b").config())
    cfg["text_config"]["num_global_key_value_heads"] = 7
    assert parse_config(cfg).num_global_kv_heads == 2  # transformers applies it only to K==V models


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"), "not a Gemma 4 checkpoint"),
        (lambda c: c["text_config"].pop("hidden_size"), "'hidden_size' is missing"),
        (lambda c: c["text_config"].update(layer_types=["sliding_attention"] * 3), "layer_types has 3 entries"),
        (lambda c: c["text_config"].update(layer_types=["banana"] * 35), "unknown layer types"),
        (lambda c: c["text_config"].pop("global_head_dim"), "global_head_dim"),
        (lambda c: c["text_config"].update(num_kv_shared_layers=35), "num_kv_shared_layers"),
        (lambda c: c["text_config"].update(per_layer_config={"0": {"head_dim": 512}}), "overrides sliding layer 0"),
        (lambda c: c["text_config"].update(per_layer_config={"4": {"head_dim": 512}, "9": {"head_dim": 128}}),
         "disagree"),
    ],
)
def test_bad_configs(mutate, message):
    cfg = copy.deepcopy(get_variant("e2b").config())
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg)


def test_not_a_dict():
    with pytest.raises(ConfigError, match="not a JSON object"):
        parse_config([1, 2])
