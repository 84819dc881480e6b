import pytest
import torch
import transformers

from gemma4_export.errors import UnknownVariantError
from gemma4_export.exporter.source import config_tower_specs
from gemma4_export.exporter.tensors import Role, expected_text_tensors
from gemma4_export.exporter.variants import TINY, VARIANTS, get_variant
from conftest import REAL


def test_registry_names():
    for base in ("e2b", "e4b", "12b", "26b-a4b", "31b"):
        assert base in VARIANTS and f"{base}-it" in VARIANTS
        assert VARIANTS[f"{base}-it"].hub_id == VARIANTS[base].hub_id + "-it"
    assert set(TINY) <= set(VARIANTS)
    assert get_variant("google/gemma-4-E2B-it").name == "e2b-it"
    assert get_variant(" E2B ").name == "e2b"


def test_unknown_variant_lists_known_ones():
    with pytest.raises(UnknownVariantError, match="unknown variant 'e3b'.*e2b, e2b-it"):
        get_variant("e3b")


@pytest.mark.parametrize("name", REAL)
def test_text_tensors_match_transformers(name):
    """The tensor list derived from the typed config equals what transformers builds for the published config
    (names and shapes), plus the k/v/k_norm that KV-shared layers carry in the real checkpoints."""
    v = get_variant(name)
    cfg = v.config()
    with torch.device("meta"):
        model = getattr(transformers, cfg["architectures"][0])(transformers.AutoConfig.for_model(**cfg))
    built = {k: tuple(t.shape) for k, t in model.state_dict().items() if ".language_model." in k}
    ours = {s.name: s.shape for s in expected_text_tensors(v.arch()) if s.role != Role.KV_SHARED_UNUSED}
    assert ours == built
    shared = [s for s in expected_text_tensors(v.arch()) if s.role == Role.KV_SHARED_UNUSED]
    assert len(shared) == 3 * v.arch().num_kv_shared_layers


@pytest.mark.parametrize("name", ["12b", "26b-a4b", "31b"])
def test_published_parameter_counts(name):
    """Text + towers from the shipped config add up to the published count (E2B/E4B tower configs are inferred and
    differ by 928 tower parameters, so they are checked through their text tensors above)."""
    v = get_variant(name)
    text = sum(s.numel for s in expected_text_tensors(v.arch()))
    towers = sum(s.numel for s in config_tower_specs(v.config()))
    assert text + towers == v.published_parameters


def test_e2b_tensor_count_matches_checkpoint_audit():
    # facts: E2B has 2,011 tensors, 600 of them text
    v = get_variant("e2b")
    text = expected_text_tensors(v.arch())
    assert len(text) == 600
    assert len(text) + len(config_tower_specs(v.config())) == 2011
