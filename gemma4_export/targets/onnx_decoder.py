"""The Gemma 4 text decoder as an ONNX graph (onnx_ops.py), built node by node while its weights stream to the
external data file. Tensors are named by their canonical keys (exporter/tensors.py), never by checkpoint spelling.

What the graph holds, following transformers' Gemma 4:
- embeddings scaled by sqrt(hidden); per-layer embeddings (PLE): table lookup * sqrt(ple_dim) plus the normed model
  projection * hidden^-0.5, both * 2^-0.5, one slice per layer through the gate, GELU, projection and norm;
- attention with scaling 1, q/k RMSNorm with weight, v RMSNorm without, RoPE per layer type (proportional RoPE on
  full layers: only the first partial_rotary_factor of each half rotates), grouped-query heads, a causal mask from
  the attention_mask, a sliding window on sliding layers; K==V full layers take the key projection as values;
- a KV cache input and output for each layer that owns one; KV-shared layers attend over their donor's present
  keys and values;
- the MoE block: router (RMSNorm, scale, projection, softmax, top-k, renormalise, per-expert scale) at full
  precision, then each expert run by an If node on the tokens routed to it only (its rows gathered, its GELU-gated
  MLP on its own weights, the rows weighted and scattered back), so compute follows the active experts;
- final norm, the tied output head, softcapping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..exporter.arch import Gemma4Arch
from ..exporter.tensors import Tensor as T
from ..exporter.tensors import hf_name
from .onnx_ops import MASKED, MASKED_F16, Graph, RowBlocks

def rope_inv_freq(head_dim: int, theta: float, rope_type: str, partial: float) -> np.ndarray:
    """Inverse frequencies for one layer type, as transformers computes them (float32, half the head dim)."""
    if rope_type == "proportional":
        angles = int(partial * head_dim // 2)
        rot = 1.0 / (theta ** (np.arange(0, 2 * angles, 2, dtype=np.float32) / head_dim))
        return np.concatenate([rot, np.zeros(head_dim // 2 - angles, np.float32)]).astype(np.float32)
    if rope_type == "default" and partial == 1.0:
        return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    from ..errors import Gemma4ExportError

    raise Gemma4ExportError(f"RoPE type {rope_type!r} with partial factor {partial} is not supported")


@dataclass
class Weights:
    """What the decoder builder asks of the export: each checkpoint tensor's plan type and its float32 rows."""

    type_of: Callable[[str], str]
    blocks: Callable[[str], RowBlocks]  # rows of the tensor as stored, flattened to [rows, last dim]
    vector: Callable[[str], np.ndarray]  # a small tensor (norm weights, scalars, router scales), float32
    prefix: str

    def name(self, key: T, layer: int | None = None) -> str:
        """The checkpoint name of a canonical key."""
        return hf_name(key, layer, self.prefix)


def cache_names(layer: int) -> tuple[str, str, str, str]:
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", f"present.{layer}.key",
            f"present.{layer}.value")


def build_embed(g: Graph, a: Gemma4Arch, w: Weights, media_ids: tuple[int, ...] = ()) -> None:
    """The embedding graph of the split layout: input_ids [B, S] -> inputs_embeds [B, S, H] (the lookup scaled by
    sqrt(H), as transformers' scaled word embedding returns it) and, with PLE, per_layer_inputs [B, S, L, P] (the
    per-layer table's lookup scaled by sqrt(P), before the projection of the embeddings is added: the decoder does
    that, as transformers' get_per_layer_inputs / project_per_layer_inputs split it). The per-layer lookup reads
    the pad token's row (a.pad_token_id) where the ids are image, audio or video placeholders (`media_ids`), as transformers'
    Gemma4Model does: an app (transformers.js) feeds the placeholder ids and writes the encoder's features over their
    inputs_embeds rows."""
    from onnx import TensorProto, helper

    h = a.hidden_size
    g.inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence"]))
    emb_name = w.name(T.TOKEN_EMBD)
    x = g.embedding("input_ids", emb_name, a.vocab_size, h, w.blocks(emb_name), w.type_of(emb_name))
    g.nodes.append(helper.make_node("Mul", [x, g.const(math.sqrt(h))], ["inputs_embeds"], name="inputs_embeds"))
    g.outputs.append(helper.make_tensor_value_info("inputs_embeds", g.ft,
                                                   ["batch_size", "sequence", h]))
    if a.has_ple:
        L, P = a.num_layers, a.ple_dim
        tname = w.name(T.PLE_TABLE)
        ids = "input_ids"
        if media_ids:
            media = None
            for k, m in enumerate(media_ids):
                eq = g.op("Equal", ["input_ids", g.const(m, np.int64)], f"ple.media{k}")
                media = eq if media is None else g.op("Or", [media, eq], f"ple.media.or{k}")
            ids = g.op("Where", [media, g.const(a.pad_token_id, np.int64), "input_ids"], "ple.ids")
        tok = g.embedding(ids, tname, a.vocab_size_per_layer_input, L * P, w.blocks(tname), w.type_of(tname))
        tok = g.op("Mul", [tok, g.const(math.sqrt(P))], "ple.tok.scaled")
        shape = g.op("Concat", [g.op("Shape", ["input_ids"], "shape.ids"), g.ints(L, P)], "shape.ple", axis=0)
        g.nodes.append(helper.make_node("Reshape", [tok, shape], ["per_layer_inputs"], name="per_layer_inputs"))
        g.outputs.append(helper.make_tensor_value_info("per_layer_inputs", g.ft,
                                                       ["batch_size", "sequence", L, P]))


def build_decoder(g: Graph, a: Gemma4Arch, w: Weights, split: bool = False) -> None:
    """Add the whole decoder to g: inputs, nodes, outputs. With `split`, the decoder of the split layout: it takes
    inputs_embeds (and per_layer_inputs) from build_embed's graph instead of input_ids, holds its own copy of the
    (tied) output head, and takes num_logits_to_keep (0: every position; n: the last n)."""
    from onnx import TensorProto, helper

    h = a.hidden_size
    if split:
        g.inputs.append(helper.make_tensor_value_info("inputs_embeds", g.ft, ["batch_size", "sequence", h]))
        if a.has_ple:
            g.inputs.append(helper.make_tensor_value_info("per_layer_inputs", g.ft,
                                                          ["batch_size", "sequence", a.num_layers, a.ple_dim]))
    else:
        g.inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence"]))
    g.inputs += [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence"]),
                 helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence"])]
    owners = [i for i in range(a.num_layers) if not a.is_kv_shared(i)]
    for i in owners:
        shape = ["batch_size", a.layer_kv_heads(i), "past_sequence", a.layer_head_dim(i)]
        pk, pv, _, _ = cache_names(i)
        g.inputs += [helper.make_tensor_value_info(pk, g.ft, shape), helper.make_tensor_value_info(pv, g.ft, shape)]

    if split:
        g.inputs.append(helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, []))

    # sizes: B, S as 1-element int64 tensors; past length from the first cache input
    ids_shape = g.op("Shape", ["inputs_embeds" if split else "input_ids"], "shape.ids")
    B = g.op("Slice", [ids_shape, g.ints(0), g.ints(1)], "batch")
    S = g.op("Slice", [ids_shape, g.ints(1), g.ints(2)], "seq")
    past = g.op("Slice", [g.op("Shape", [cache_names(owners[0])[0]], "shape.past"), g.ints(2), g.ints(3)],
                "past_len")

    masks = _masks(g, a, S, past)
    rope = {kind: _rope_tables(g, a, kind) for kind in {a.layer_types[i] for i in range(a.num_layers)}}

    # embeddings
    emb_name = w.name(T.TOKEN_EMBD)
    if split:
        x = g.op("Reshape", ["inputs_embeds", g.ints(-1, h)], "embed.flat")
        ple = None
        if a.has_ple:
            tok = g.op("Reshape", ["per_layer_inputs", g.ints(-1, a.num_layers, a.ple_dim)], "ple.tok")
            ple = _per_layer_inputs(g, a, w, x, tok)
    else:
        ids_flat = g.op("Reshape", ["input_ids", g.ints(-1)], "ids.flat")
        x = g.embedding(ids_flat, emb_name, a.vocab_size, h, w.blocks(emb_name), w.type_of(emb_name))
        x = g.op("Mul", [x, g.const(math.sqrt(h))], "embed.scaled")
        ple = _per_layer_inputs(g, a, w, x, _ple_lookup(g, a, w, ids_flat)) if a.has_ple else None

    kv: dict[int, tuple[str, str]] = {}
    for i in range(a.num_layers):
        x = _layer(g, a, w, i, x, B, S, masks, rope, kv, ple)

    n_out = S
    if split:  # only the last num_logits_to_keep positions reach the head (0: all of them)
        keep = g.op("Neg", [g.op("Reshape", ["num_logits_to_keep", g.ints(1)], "keep.1")], "keep.start")
        x3 = g.op("Reshape", [x, g.op("Concat", [B, S, g.ints(h)], "shape.hidden", axis=0)], "hidden.3d")
        x3 = g.op("Slice", [x3, keep, g.ints(2**62), g.ints(1)], "hidden.kept")
        n_out = g.op("Slice", [g.op("Shape", [x3], "shape.kept"), g.ints(1), g.ints(2)], "kept")
        x = g.op("Reshape", [x3, g.ints(-1, h)], "hidden.kept.flat")
    x = g.rms_norm(x, g.const(w.vector(w.name(T.OUTPUT_NORM))), a.rms_norm_eps, "final_norm")
    if a.tie_word_embeddings and not split:
        logits = g.tied_head(x, emb_name, a.vocab_size, h)
    elif a.tie_word_embeddings:  # the split decoder's own copy of the table, as the head
        logits = g.linear(x, emb_name, a.vocab_size, h, w.blocks(emb_name), w.type_of(emb_name), hint="head")
    else:  # an untied head (a fine-tune saved with tie_word_embeddings false): a linear layer of its own
        logits = _lin(g, w, x, w.name(T.OUTPUT), a.vocab_size, h)
    if a.final_logit_softcapping:
        c = g.const(a.final_logit_softcapping)
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, c], "softcap.div")], "softcap.tanh"), c],
                      "softcap")
    if g.half:  # the logits leave the graph in float32 whatever it computes in
        logits = g.op("Cast", [logits], "logits.f32", to=1)
    shaped = g.op("Reshape", [logits, g.op("Concat", [B, n_out, g.ints(a.vocab_size)], "shape.logits", axis=0)],
                  "logits.shaped")
    g.nodes.append(helper.make_node("Identity", [shaped], ["logits"], name="logits"))
    g.outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                   ["batch_size", "kept_sequence", a.vocab_size]))
    for i in owners:
        _, _, ok, ov = cache_names(i)
        shape = ["batch_size", a.layer_kv_heads(i), "total_sequence", a.layer_head_dim(i)]
        k, v = kv[i]
        g.nodes.append(helper.make_node("Identity", [k], [ok], name=ok))
        g.nodes.append(helper.make_node("Identity", [v], [ov], name=ov))
        g.outputs += [helper.make_tensor_value_info(ok, g.ft, shape), helper.make_tensor_value_info(ov, g.ft, shape)]


def _masks(g: Graph, a: Gemma4Arch, S: str, past: str) -> dict[str, str]:
    """Boolean masks [B, 1, 1, S, T] per layer type: causal over cache positions, padding from attention_mask, and
    the sliding window (key > query - window) on sliding layers."""
    total = g.op("Add", [past, S], "total_len")
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    q = g.op("Add", [g.op("Range", [zero, g.op("Squeeze", [S], "s.scalar"), one], "q.range"), past], "q.pos")
    k = g.op("Range", [zero, g.op("Squeeze", [total], "t.scalar"), one], "k.pos")
    qc = g.op("Unsqueeze", [q, g.ints(1)], "q.col")  # [S, 1]
    causal = g.op("LessOrEqual", [k, qc], "causal")  # [S, T]
    pad = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.ints(1, 2, 3)], "pad.u")], "pad", to=9)
    full = g.op("And", [causal, pad], "mask.full")  # [B, 1, 1, S, T]
    out = {"full_attention": full}
    if "sliding_attention" in a.layer_types:
        lo = g.op("Sub", [qc, g.const(a.sliding_window, np.int64)], "window.lo")
        inside = g.op("Greater", [k, lo], "window")
        out["sliding_attention"] = g.op("And", [full, inside], "mask.sliding")
    return out


def _rope_tables(g: Graph, a: Gemma4Arch, kind: str) -> tuple[str, str]:
    """cos and sin [B, S, 1, head_dim] for one layer type, from position_ids."""
    full = kind == "full_attention"
    r = a.rope_full if full else a.rope_sliding
    hd = a.global_head_dim if full else a.head_dim
    inv = rope_inv_freq(hd, r.theta, r.rope_type, r.partial_rotary_factor)
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], "pos.f", to=1), g.ints(-1)], "pos.u")
    freqs = g.op("Mul", [pos, g.const(inv, np.float32)], f"rope.{kind}.freqs")  # angles in float32 always
    emb = g.op("Concat", [freqs, freqs], f"rope.{kind}.emb", axis=-1)
    cos, sin = g.op("Cos", [emb], f"rope.{kind}.cos"), g.op("Sin", [emb], f"rope.{kind}.sin")
    if g.half:
        cos, sin = (g.op("Cast", [c], f"rope.{kind}.{n}16", to=10) for c, n in ((cos, "cos"), (sin, "sin")))
    cos = g.op("Unsqueeze", [cos, g.ints(2)], f"rope.{kind}.cos.u")
    sin = g.op("Unsqueeze", [sin, g.ints(2)], f"rope.{kind}.sin.u")
    return cos, sin


def _apply_rope(g: Graph, x: str, cos: str, sin: str, hd: int, hint: str) -> str:
    x1, x2 = g.op("Split", [x, g.ints(hd // 2, hd // 2)], hint + ".split", outputs=2, axis=-1)
    rot = g.op("Concat", [g.op("Neg", [x2], hint + ".neg"), x1], hint + ".rot", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], hint + ".cos"), g.op("Mul", [rot, sin], hint + ".sin")], hint)


def _ple_lookup(g: Graph, a: Gemma4Arch, w: Weights, ids: str) -> str:
    """[T, layers, ple_dim]: the per-layer table's rows for the tokens, scaled by sqrt(P)."""
    L, P = a.num_layers, a.ple_dim
    tname = w.name(T.PLE_TABLE)
    tok = g.embedding(ids, tname, a.vocab_size_per_layer_input, L * P, w.blocks(tname), w.type_of(tname))
    tok = g.op("Mul", [tok, g.const(math.sqrt(P))], "ple.tok.scaled")
    return g.op("Reshape", [tok, g.ints(-1, L, P)], "ple.tok")


def _per_layer_inputs(g: Graph, a: Gemma4Arch, w: Weights, x: str, tok: str) -> str:
    """[T, layers, ple_dim]: (table lookup * sqrt(P) + norm(projection(x) * H^-0.5)) * 2^-0.5."""
    L, P = a.num_layers, a.ple_dim
    pname = w.name(T.PLE_MODEL_PROJ)
    proj = g.linear(x, pname, L * P, a.hidden_size, w.blocks(pname), w.type_of(pname))
    proj = g.op("Reshape", [g.op("Mul", [proj, g.const(a.hidden_size ** -0.5)], "ple.proj.scaled"),
                            g.ints(-1, L, P)], "ple.proj")
    proj = g.rms_norm(proj, g.const(w.vector(w.name(T.PLE_PROJ_NORM))), a.rms_norm_eps,
                      "ple.proj.norm")
    return g.op("Mul", [g.op("Add", [proj, tok], "ple.sum"), g.const(2.0 ** -0.5)], "ple")


def _lin(g: Graph, w: Weights, x: str, name: str, out_f: int, in_f: int) -> str:
    return g.linear(x, name, out_f, in_f, w.blocks(name), w.type_of(name))


def _norm(g: Graph, a: Gemma4Arch, w: Weights, x: str, name: str) -> str:
    return g.rms_norm(x, g.const(w.vector(name)), a.rms_norm_eps, name.removesuffix(".weight"))


def _layer(g: Graph, a: Gemma4Arch, w: Weights, i: int, x: str, B: str, S: str, masks: dict, rope: dict,
           kv: dict, ple: str | None) -> str:
    n = lambda key: w.name(key, i)  # noqa: E731
    h = a.hidden_size
    residual = x
    y = _norm(g, a, w, x, n(T.ATTN_NORM))
    y = _attention(g, a, w, i, y, B, S, masks, rope, kv)
    y = _norm(g, a, w, y, n(T.ATTN_POST_NORM))
    x = g.op("Add", [residual, y], f"layers.{i}.attn.residual")

    residual = x
    y = _norm(g, a, w, x, n(T.FFN_PRE_NORM))
    wd = a.mlp_width(i)
    gate = g.gelu(_lin(g, w, y, n(T.FFN_GATE), wd, h), f"layers.{i}.mlp.act")
    up = _lin(g, w, y, n(T.FFN_UP), wd, h)
    y = _lin(g, w, g.op("Mul", [gate, up], f"layers.{i}.mlp.glu"), n(T.FFN_DOWN), h, wd)
    if a.moe:
        y1 = _norm(g, a, w, y, n(T.FFN_POST_NORM_1))
        y2 = _moe(g, a, w, i, residual)
        y2 = _norm(g, a, w, y2, n(T.FFN_POST_NORM_2))
        y = g.op("Add", [y1, y2], f"layers.{i}.moe.sum")
    y = _norm(g, a, w, y, n(T.FFN_POST_NORM))
    x = g.op("Add", [residual, y], f"layers.{i}.mlp.residual")

    if ple is not None:
        residual = x
        sl = g.op("Gather", [ple, g.const(i, np.int64)], f"layers.{i}.ple.slice", axis=1)  # [T, P]
        y = g.gelu(_lin(g, w, x, n(T.PLE_GATE), a.ple_dim, h), f"layers.{i}.ple.act")
        y = _lin(g, w, g.op("Mul", [y, sl], f"layers.{i}.ple.gated"), n(T.PLE_PROJ), h,
                 a.ple_dim)
        y = _norm(g, a, w, y, n(T.PLE_POST_NORM))
        x = g.op("Add", [residual, y], f"layers.{i}.ple.residual")
    return g.op("Mul", [x, g.const(w.vector(n(T.LAYER_SCALAR)))], f"layers.{i}.scaled")


def _heads(g: Graph, x: str, B: str, n: int, hd: int, hint: str) -> str:
    """[T, n*hd] -> [B, S, n, hd]."""
    return g.op("Reshape", [x, g.op("Concat", [B, g.ints(-1, n, hd)], hint + ".shape", axis=0)], hint)


def _attention(g: Graph, a: Gemma4Arch, w: Weights, i: int, x: str, B: str, S: str, masks: dict, rope: dict,
               kv: dict) -> str:
    n = lambda key: w.name(key, i)  # noqa: E731
    h, nh, hd = a.hidden_size, a.num_heads, a.layer_head_dim(i)
    kind = a.layer_types[i]
    cos, sin = rope[kind]
    t = f"layers.{i}.attn"
    q = _heads(g, _lin(g, w, x, n(T.ATTN_Q), nh * hd, h), B, nh, hd, t + ".q")
    q = g.rms_norm(q, g.const(w.vector(n(T.ATTN_Q_NORM))), a.rms_norm_eps, t + ".q_norm")
    q = g.op("Transpose", [_apply_rope(g, q, cos, sin, hd, t + ".q_rope")], t + ".q_t", perm=[0, 2, 1, 3])
    if a.is_kv_shared(i):
        k_all, v_all = kv[a.kv_donor(i)]
        kvh = a.layer_kv_heads(a.kv_donor(i))
    else:
        kvh = a.layer_kv_heads(i)
        k_raw = _heads(g, _lin(g, w, x, n(T.ATTN_K), kvh * hd, h), B, kvh, hd, t + ".k")
        v = (_heads(g, _lin(g, w, x, n(T.ATTN_V), kvh * hd, h), B, kvh, hd, t + ".v")
             if a.has_v_proj(i) else k_raw)  # K==V: the key projection is also the value projection
        k = g.rms_norm(k_raw, g.const(w.vector(n(T.ATTN_K_NORM))), a.rms_norm_eps, t + ".k_norm")
        k = g.op("Transpose", [_apply_rope(g, k, cos, sin, hd, t + ".k_rope")], t + ".k_t", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.rms_norm(v, None, a.rms_norm_eps, t + ".v_norm")], t + ".v_t", perm=[0, 2, 1, 3])
        pk, pv, _, _ = cache_names(i)
        k_all = g.op("Concat", [pk, k], t + ".k_all", axis=2)
        v_all = g.op("Concat", [pv, v], t + ".v_all", axis=2)
        kv[i] = (k_all, v_all)
    groups = nh // kvh
    # grouped-query attention without repeating K/V: q [B, kvh, groups, S, hd] against k [B, kvh, 1, T, hd]
    q5 = g.op("Reshape", [q, g.op("Concat", [B, g.ints(kvh, groups, -1, hd)], t + ".q5.shape", axis=0)], t + ".q5")
    k5 = g.op("Unsqueeze", [k_all, g.ints(2)], t + ".k5")
    v5 = g.op("Unsqueeze", [v_all, g.ints(2)], t + ".v5")
    scores = g.op("MatMul", [q5, g.op("Transpose", [k5], t + ".kT", perm=[0, 1, 2, 4, 3])], t + ".scores")
    scores = g.op("Where", [masks[kind], scores, g.const(MASKED_F16 if g.half else MASKED)], t + ".masked")
    probs = g.op("Softmax", [scores], t + ".probs", axis=-1)
    o = g.op("MatMul", [probs, v5], t + ".ctx")  # [B, kvh, groups, S, hd]
    o = g.op("Reshape", [o, g.op("Concat", [B, g.ints(nh, -1, hd)], t + ".ctx.shape", axis=0)], t + ".ctx4")
    o = g.op("Reshape", [g.op("Transpose", [o], t + ".ctx_t", perm=[0, 2, 1, 3]), g.ints(-1, nh * hd)],
             t + ".ctx2")
    return _lin(g, w, o, n(T.ATTN_OUT), h, nh * hd)


def _moe(g: Graph, a: Gemma4Arch, w: Weights, i: int, x: str) -> str:
    """The expert block on the residual stream x [T, H]: the router at full precision, then each expert computed on
    the tokens routed to it only. Every expert is an If node whose branch runs when some token chose it: it gathers
    those tokens, runs the expert's GELU-gated MLP on them (MatMulNBits or Gemm on the expert's own weights, views of
    the checkpoint's [E, out, in] tensors), scales each row by its routing weight and hands back the rows and their
    token indices; a ScatterND adds them up. Decoding one token runs top_k experts, not all of them; a prompt costs
    T * top_k expert rows, as in transformers."""
    n = lambda key: w.name(key, i)  # noqa: E731
    m, h = a.moe, a.hidden_size
    E, I, K = m.num_experts, m.intermediate_size, m.top_k
    t = f"layers.{i}.moe"
    r = g.rms_norm(x, None, a.rms_norm_eps, t + ".router.norm")
    r = g.op("Mul", [r, g.const(w.vector(n(T.ROUTER_SCALE)) * np.float32(h ** -0.5))], t + ".router.scaled")
    probs = g.op("Softmax", [_lin(g, w, r, n(T.ROUTER), E, h)], t + ".router.probs", axis=-1)
    top_w, top_i = g.op("TopK", [probs, g.ints(K)], t + ".router.topk", outputs=2, axis=-1)
    top_w = g.op("Div", [top_w, g.op("ReduceSum", [top_w, g.ints(-1)], t + ".router.sum", keepdims=1)],
                 t + ".router.renorm")
    top_w = g.op("Mul", [top_w, g.op("Gather", [g.const(w.vector(n(T.ROUTER_EXPERT_SCALE))), top_i],
                                     t + ".router.expert_scale")], t + ".router.weights")
    zeros = g.op("ConstantOfShape", [g.op("Shape", [probs], t + ".router.shape")], t + ".router.zeros",
                 value=_zero_tensor(g.np_f))
    dense = g.op("ScatterElements", [zeros, top_i, top_w], t + ".router.dense", axis=1)  # [T, E], 0 unless chosen
    chosen = g.op("ReduceMax", [g.op("Cast", [g.op("Greater", [dense, g.const(0.0)], t + ".chosen.tok")],
                                     t + ".chosen.f", to=g.ft), g.ints(0)], t + ".chosen.any", keepdims=0)  # [E]

    y = _norm(g, a, w, x, n(T.FFN_PRE_NORM_2))
    gu_name, down_name = n(T.EXPERTS_GATE_UP), n(T.EXPERTS_DOWN)
    gu_type, down_type = w.type_of(gu_name), w.type_of(down_name)
    gate_up = g.expert_weights(gu_name, E, 2 * I, h, w.blocks(gu_name), gu_type)  # [E, 2I, H]
    down = g.expert_weights(down_name, E, h, I, w.blocks(down_name), down_type)  # [E, H, I]
    no_rows, no_index = g.const(np.zeros((0, h))), g.const(np.zeros((0, 1)), np.int64)
    rows, index = [], []
    for e in range(E):
        te = f"{t}.expert{e}"
        ei = g.const(e, np.int64)
        cond = g.op("Greater", [g.op("Gather", [chosen, ei], te + ".chosen", axis=0), g.const(0.0)], te + ".used")
        with g.subgraph() as body:
            wt = g.op("Gather", [dense, ei], te + ".w", axis=1)  # [T]
            idx = g.op("Reshape", [g.op("NonZero", [g.op("Greater", [wt, g.const(0.0)], te + ".mask")], te + ".nz"),
                                   g.ints(-1)], te + ".idx")  # the tokens that chose this expert
            xs = g.op("Gather", [y, idx], te + ".x", axis=0)
            gu = g.expert_linear(xs, gate_up[e], 2 * I, h, gu_type, te + ".gate_up")
            gate, up = g.op("Split", [gu, g.ints(I, I)], te + ".split", outputs=2, axis=-1)
            act = g.op("Mul", [g.gelu(gate, te + ".act"), up], te + ".glu")
            o = g.expert_linear(act, down[e], h, I, down_type, te + ".down")
            o = g.op("Mul", [o, g.op("Unsqueeze", [g.op("Gather", [wt, idx], te + ".ws", axis=0), g.ints(1)],
                                     te + ".wcol")], te + ".out")
            at = g.op("Unsqueeze", [idx, g.ints(1)], te + ".at")
        then = _branch(g, body, f"{te}.then", [o, at])
        with g.subgraph() as body:
            o0 = g.op("Identity", [no_rows], te + ".none")
            at0 = g.op("Identity", [no_index], te + ".none.at")
        orelse = _branch(g, body, f"{te}.else", [o0, at0])
        ro, ri = g.op("If", [cond], te, outputs=2, then_branch=then, else_branch=orelse)
        rows.append(ro)
        index.append(ri)
    out = g.op("ConstantOfShape", [g.op("Shape", [y], t + ".shape")], t + ".zeros", value=_zero_tensor())
    rows = g.op("Concat", rows, t + ".rows", axis=0)
    if g.half:  # onnxruntime's CPU ScatterND adds in float32 only: the sum in float32, then back
        rows = g.op("Cast", [rows], t + ".rows.f32", to=1)
    out = g.op("ScatterND", [out, g.op("Concat", index, t + ".index", axis=0), rows], t + ".sum", reduction="add")
    return g.op("Cast", [out], t + ".sum.f16", to=10) if g.half else out


def _branch(g: Graph, nodes: list, name: str, outputs: list[str]):
    from onnx import TensorProto, helper

    types = [g.ft, TensorProto.INT64]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, ty, None)
                                               for o, ty in zip(outputs, types)])


def _zero_tensor(dtype=np.float32):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.zeros(1, dtype))
