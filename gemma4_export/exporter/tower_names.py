"""The tower tensors' names: what each one is (tower_kind, for the tower rules), and where llama.cpp's gemma4
projector (mmproj GGUF) holds it (mmproj_tensor). Hugging Face's spellings of the towers live here, beside the text
decoder's (tensors.py)."""

from __future__ import annotations

import re

from ..errors import CheckpointError

TOWER_SCALAR_SUFFIXES = (".input_max", ".input_min", ".output_max", ".output_min", "layer_scalar", "std_bias",
                         "std_scale", "per_dim_scale", "per_dim_key_scale")


def tower_kind(name: str, shape: tuple[int, ...]) -> str:
    """What a tower tensor is, as the tower rules see it: scalar, norm, bias, position, conv, patch or matrix."""
    if name.endswith(TOWER_SCALAR_SUFFIXES):
        return "scalar"
    if name.endswith(".bias"):
        return "bias"
    if "position_embedding_table" in name or "pos_embedding" in name or "relative_k_proj" in name:
        return "position"
    if "norm" in name.rsplit(".", 2)[-2] or len(shape) < 2:
        return "norm"
    if "conv" in name and "audio" in name and len(shape) > 2:
        return "conv"
    if "patch_embedder" in name and len(shape) >= 2:  # a convolution kernel in llama.cpp (the unified model's
        return "patch"                                   # patch_dense is a dense layer there: a matrix)
    return "matrix"


# (pattern on the name without "model.", GGUF name template, transform). First match wins; {0} is the layer.
_CLIP = r"(?:\.linear)?\.(weight|input_max|input_min|output_max|output_min)$"
_VISION: tuple[tuple[str, str, str], ...] = (
    (r"vision_tower\.patch_embedder\.input_proj\.weight$", "v.patch_embd.weight", "patch"),
    (r"vision_tower\.patch_embedder\.position_embedding_table$", "v.position_embd.weight", ""),
    (r"vision_tower\.std_bias$", "v.std_bias", ""),
    (r"vision_tower\.std_scale$", "v.std_scale", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.input_layernorm\.weight$", "v.blk.{0}.ln1.weight", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.post_attention_layernorm\.weight$", "v.blk.{0}.attn_post_norm.weight", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.pre_feedforward_layernorm\.weight$", "v.blk.{0}.ln2.weight", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.post_feedforward_layernorm\.weight$", "v.blk.{0}.ffn_post_norm.weight", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.q_norm\.weight$", "v.blk.{0}.attn_q_norm.weight", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.k_norm\.weight$", "v.blk.{0}.attn_k_norm.weight", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.q_proj" + _CLIP, "v.blk.{0}.attn_q.{1}", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.k_proj" + _CLIP, "v.blk.{0}.attn_k.{1}", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.v_proj" + _CLIP, "v.blk.{0}.attn_v.{1}", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.o_proj" + _CLIP, "v.blk.{0}.attn_out.{1}", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.gate_proj" + _CLIP, "v.blk.{0}.ffn_gate.{1}", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.up_proj" + _CLIP, "v.blk.{0}.ffn_up.{1}", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.down_proj" + _CLIP, "v.blk.{0}.ffn_down.{1}", ""),
    (r"vision_tower\.encoder\.layers\.(\d+)\.layer_scalar$", "v.blk.{0}.out_scale.weight", ""),
    (r"embed_vision\.embedding_projection\.weight$", "mm.input_projection.weight", ""),
)
_AUDIO_LAYER = r"audio_tower\.layers\.(\d+)\."
_AUDIO: tuple[tuple[str, str, str], ...] = (
    (r"audio_tower\.subsample_conv_projection\.layer(\d)\.conv\.weight$", "a.conv1d.{0}.weight", ""),
    (r"audio_tower\.subsample_conv_projection\.layer(\d)\.norm\.weight$", "a.conv1d.{0}.norm.weight", ""),
    (r"audio_tower\.subsample_conv_projection\.input_proj_linear\.weight$", "a.input_projection.weight", ""),
    (r"audio_tower\.output_proj\.(weight|bias)$", "a.pre_encode.out.{0}", ""),
    (_AUDIO_LAYER + r"feed_forward1\.pre_layer_norm\.weight$", "a.blk.{0}.ffn_norm.weight", ""),
    (_AUDIO_LAYER + r"feed_forward1\.post_layer_norm\.weight$", "a.blk.{0}.ffn_post_norm.weight", ""),
    (_AUDIO_LAYER + r"feed_forward1\.ffw_layer_1" + _CLIP, "a.blk.{0}.ffn_up.{1}", ""),
    (_AUDIO_LAYER + r"feed_forward1\.ffw_layer_2" + _CLIP, "a.blk.{0}.ffn_down.{1}", ""),
    (_AUDIO_LAYER + r"feed_forward2\.pre_layer_norm\.weight$", "a.blk.{0}.ffn_norm_1.weight", ""),
    (_AUDIO_LAYER + r"feed_forward2\.post_layer_norm\.weight$", "a.blk.{0}.ffn_post_norm_1.weight", ""),
    (_AUDIO_LAYER + r"feed_forward2\.ffw_layer_1" + _CLIP, "a.blk.{0}.ffn_up_1.{1}", ""),
    (_AUDIO_LAYER + r"feed_forward2\.ffw_layer_2" + _CLIP, "a.blk.{0}.ffn_down_1.{1}", ""),
    # clip.cpp loads these two crossed (the names llama.cpp's converter gives them), so they are written crossed
    (_AUDIO_LAYER + r"lconv1d\.pre_layer_norm\.weight$", "a.blk.{0}.conv_norm.weight", ""),
    (_AUDIO_LAYER + r"lconv1d\.conv_norm\.weight$", "a.blk.{0}.norm_conv.weight", ""),
    (_AUDIO_LAYER + r"lconv1d\.linear_start" + _CLIP, "a.blk.{0}.conv_pw1.{1}", ""),
    (_AUDIO_LAYER + r"lconv1d\.linear_end" + _CLIP, "a.blk.{0}.conv_pw2.{1}", ""),
    (_AUDIO_LAYER + r"lconv1d\.depthwise_conv1d\.weight$", "a.blk.{0}.conv_dw.weight", "depthwise"),
    (_AUDIO_LAYER + r"norm_pre_attn\.weight$", "a.blk.{0}.attn_pre_norm.weight", ""),
    (_AUDIO_LAYER + r"norm_post_attn\.weight$", "a.blk.{0}.attn_post_norm.weight", ""),
    (_AUDIO_LAYER + r"norm_out\.weight$", "a.blk.{0}.ln2.weight", ""),
    (_AUDIO_LAYER + r"self_attn\.q_proj" + _CLIP, "a.blk.{0}.attn_q.{1}", ""),
    (_AUDIO_LAYER + r"self_attn\.k_proj" + _CLIP, "a.blk.{0}.attn_k.{1}", ""),
    (_AUDIO_LAYER + r"self_attn\.v_proj" + _CLIP, "a.blk.{0}.attn_v.{1}", ""),
    (_AUDIO_LAYER + r"self_attn\.post" + _CLIP, "a.blk.{0}.attn_out.{1}", ""),
    (_AUDIO_LAYER + r"self_attn\.relative_k_proj\.weight$", "a.blk.{0}.attn_k_rel.weight", ""),
    (_AUDIO_LAYER + r"self_attn\.per_dim_scale$", "a.blk.{0}.per_dim_scale.weight", "softplus"),
    (_AUDIO_LAYER + r"self_attn\.per_dim_key_scale$", "a.blk.{0}.per_dim_k_scale.weight", "softplus"),
    (r"embed_audio\.embedding_projection\.weight$", "mm.a.input_projection.weight", ""),
)
# The unified 12B's encoder-free embedders, under transformers' names (embed_vision.*) and the hub's
# (vision_embedder.*, embed_vision.embedding_projection). The patch dense layer and the first layer norm act on a
# 48 x 48 x 3 patch flattened (y, x, channel); llama.cpp's gemma4uv flattens it (channel, y, x): "hwc_columns" /
# "hwc_vector" reorder them. The position table [S, 2, D] is [2, S, D] there ("swap01").
_UNIFIED: tuple[tuple[str, str, str], ...] = (
    (r"(?:embed_vision|vision_embedder)\.patch_dense\.weight$", "v.patch_embd.weight", "hwc_columns"),
    (r"(?:embed_vision|vision_embedder)\.patch_dense\.bias$", "v.patch_embd.bias", ""),
    (r"(?:embed_vision|vision_embedder)\.patch_ln1\.(weight|bias)$", "v.patch_norm.1.{0}", "hwc_vector"),
    (r"(?:embed_vision|vision_embedder)\.patch_ln2\.(weight|bias)$", "v.patch_norm.2.{0}", ""),
    (r"(?:embed_vision|vision_embedder)\.pos_norm\.(weight|bias)$", "v.patch_norm.3.{0}", ""),
    (r"(?:embed_vision|vision_embedder)\.pos_embedding$", "v.position_embd.weight", "swap01"),
    (r"embed_vision\.(?:multimodal_embedder\.)?embedding_projection\.weight$", "mm.input_projection.weight", ""),
    (r"embed_audio\.embedding_projection\.weight$", "mm.a.input_projection.weight", ""),
)
_TABLE = tuple((re.compile(p), n, t) for p, n, t in _VISION + _AUDIO)
_TABLE_UNIFIED = tuple((re.compile(p), n, t) for p, n, t in _UNIFIED)


def mmproj_tensor(name: str, unified: bool = False) -> tuple[str, str]:
    """(GGUF name, transform) of a tower tensor of Gemma4ForConditionalGeneration (or, `unified`, of
    Gemma4UnifiedForConditionalGeneration); CheckpointError if unknown."""
    short = name.removeprefix("model.")
    for rx, template, transform in (_TABLE_UNIFIED if unified else _TABLE):
        m = rx.match(short)
        if m:
            return template.format(*m.groups()), transform
    raise CheckpointError(f"tower tensor '{name}' has no place in llama.cpp's gemma4 projector (an unknown tower layout)")
