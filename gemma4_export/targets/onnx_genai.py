"""onnxruntime-genai's multimodal `gemma4` model type over an ONNX directory the ONNX target wrote.

genai runs a `gemma4` model as a pipeline of four sessions (its MultiModalLanguageModel):
- vision (always: genai creates the vision session for every `gemma4` config): pixel_values [N, patches, 768],
  pixel_position_ids [N, patches, 2] -> image_features [image tokens, H]: our vision_encoder, as it is;
- speech (optional; needs both `filename` and `config_filename`): input_features [1, T, 128], input_features_mask
  [1, T] -> audio_features [audio tokens, H]: our audio_encoder, as it is;
- embedding: input_ids, image_features [n, H], audio_features [m, H] -> inputs_embeds [B, S, H], per_layer_inputs
  [B, S, L*P]: genai hands the encoders' features to this graph and expects their rows written over the placeholder
  tokens inside it, and allocates per_layer_inputs as a rank-3 buffer whose last dimension it reads from the graph;
- decoder: inputs_embeds, per_layer_inputs [B, S, L*P], attention_mask, position_ids, past_key_values.* -> logits,
  present.*.

So two small wrapper graphs are written beside ours (onnx/genai_embedding{sfx}.onnx and onnx/genai_decoder{sfx}.onnx):
the embedding graph is embed_tokens plus the scatter of the features over the image / audio placeholders and a
reshape of per_layer_inputs to [B, S, L*P]; the decoder graph is decoder_model_merged behind a reshape of
per_layer_inputs back to [B, S, L, P]. Their initializers keep their external data entries (as single_graph's do),
so they read embed_tokens' and decoder_model_merged's own data files: no weight is copied.

genai's Gemma4MultiModalProcessor (onnxruntime-extensions) reads image_processor.json (DecodeImage ->
Gemma4ImageTransform) and, for audio, audio_feature_extraction.json (AudioDecoder -> Gemma4LogMel); both are written
here from the checkpoint's config.
"""

from __future__ import annotations

import json
from pathlib import Path

from .onnx import CONFIG_FILE, DECODER, EMBED, ONNX_DIR, genai_config, graph_files, model_like, suffix

GENAI_EMBED, GENAI_DECODER = "genai_embedding", "genai_decoder"
IMAGE_PROCESSOR, AUDIO_PROCESSOR = "image_processor.json", "audio_feature_extraction.json"
VISION, AUDIO = "vision_encoder", "audio_encoder"


def genai_files(preset: str) -> dict[str, str]:
    """{part: path of the genai wrapper graph relative to the artifact directory}."""
    return {part: f"{ONNX_DIR}/{part}{suffix(preset)}.onnx" for part in (GENAI_EMBED, GENAI_DECODER)}


def _encoder_file(directory: Path, part: str, preset: str) -> str | None:
    rel = f"{ONNX_DIR}/{part}{suffix(preset)}.onnx"
    return rel if (directory / rel).is_file() else None


def _rename_all(graph, rename) -> None:
    """Rename every value a node of `graph` (and of its subgraphs) reads or writes, through `rename`."""
    for n in graph.node:
        n.input[:] = [rename(x) for x in n.input]
        n.output[:] = [rename(x) for x in n.output]
        for a in n.attribute:
            if a.g.node:
                _rename_all(a.g, rename)
            for g in a.graphs:
                _rename_all(g, rename)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def embedding_graph(embed, image_token_id: int | None, audio_token_id: int | None, name: str):
    """embed_tokens as genai's `gemma4` embedding session: input_ids, image_features [n, H] and audio_features [m, H]
    -> inputs_embeds [B, S, H] with the features' rows, in order, over the image / audio placeholder tokens, and
    per_layer_inputs [B, S, L*P]. A placeholder with no feature row left keeps its token embedding."""
    from onnx import TensorProto, helper

    g = type(embed.graph)()
    g.CopyFrom(embed.graph)
    outs = {o.name: o for o in g.output}
    hidden = _dims(outs["inputs_embeds"])[-1]
    ple = outs.get("per_layer_inputs")
    ft = outs["inputs_embeds"].type.tensor_type.elem_type
    _rename_all(g, lambda x: f"text/{x}" if x in outs else x)
    nodes, inits = list(g.node), list(g.initializer)

    def const(cname, value):
        inits.append(helper.make_tensor(cname, TensorProto.INT64, [len(value)], value))
        return cname

    def op(kind, inputs, out, **attrs):
        nodes.append(helper.make_node(kind, inputs, [out], name=f"genai/{out}", **attrs))
        return out

    inputs = list(g.input)
    embeds = "text/inputs_embeds"
    zero_row = op("ConstantOfShape", [const("genai/row_shape", [1, hidden])], "genai/zero_row",
                  value=helper.make_tensor("zero", ft, [1], [0]))
    flat_ids = op("Reshape", ["input_ids", const("genai/flat", [-1])], "genai/flat_ids")
    flat_embeds = op("Reshape", [embeds, const("genai/rows", [-1, hidden])], "genai/flat_embeds")
    for kind, token in (("image", image_token_id), ("audio", audio_token_id)):
        if token is None:
            continue
        feats = f"{kind}_features"
        # float32, as our encoders write their features in every preset (and genai hands them on as they are)
        inputs.append(helper.make_tensor_value_info(feats, TensorProto.FLOAT, [f"num_{kind}_tokens", hidden]))
        if ft != TensorProto.FLOAT:
            feats = op("Cast", [feats], f"genai/{kind}_features_cast", to=ft)
        # row k of the features goes to the k-th placeholder (1-based through a leading zero row, so that no
        # index is out of range when there are no features, as in every step after the prompt)
        at = op("Equal", [flat_ids, const(f"genai/{kind}_token", [token])], f"genai/{kind}_at")
        count = op("CumSum", [op("Cast", [at], f"genai/{kind}_at64", to=TensorProto.INT64),
                              const(f"genai/{kind}_axis", [0])], f"genai/{kind}_count")
        table = op("Concat", [zero_row, feats], f"genai/{kind}_table", axis=0)
        n = op("Sub", [op("Shape", [table], f"genai/{kind}_shape", end=1), const(f"genai/{kind}_one", [1])],
               f"genai/{kind}_n")
        have = op("And", [at, op("LessOrEqual", [count, n], f"genai/{kind}_fits")], f"genai/{kind}_have")
        index = op("Mul", [count, op("Cast", [have], f"genai/{kind}_have64", to=TensorProto.INT64)],
                   f"genai/{kind}_index")
        rows = op("Gather", [table, index], f"genai/{kind}_rows", axis=0)
        flat_embeds = op("Where", [op("Unsqueeze", [have, const(f"genai/{kind}_last", [1])], f"genai/{kind}_mask"),
                                   rows, flat_embeds], f"genai/{kind}_embeds")
    op("Reshape", [flat_embeds, op("Shape", [embeds], "genai/embeds_shape")], "inputs_embeds")
    outputs = [helper.make_tensor_value_info("inputs_embeds", ft, _dims(outs["inputs_embeds"]))]
    if ple is not None:
        b, s, layers, p = _dims(ple)
        op("Reshape", ["text/per_layer_inputs", const("genai/ple_flat", [0, 0, layers * p])], "per_layer_inputs")
        outputs.append(helper.make_tensor_value_info("per_layer_inputs", ft, [b, s, layers * p]))
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    return model_like(graph, embed)


def decoder_graph(decoder, name: str):
    """decoder_model_merged as genai's `gemma4` decoder session: per_layer_inputs taken as [B, S, L*P] (the rank-3
    buffer genai allocates) and reshaped to [B, S, L, P] before the decoder reads it, and num_logits_to_keep a
    constant 0 (logits for every position, as gemma4_text's decoder is fed); everything else unchanged."""
    from onnx import helper

    g = type(decoder.graph)()
    g.CopyFrom(decoder.graph)
    g.name = name
    ins = {i.name: i for i in g.input}
    if "num_logits_to_keep" in ins:  # genai's multimodal decoder state feeds no extra inputs: 0, every position
        g.input.remove(ins.pop("num_logits_to_keep"))
        g.initializer.append(helper.make_tensor("num_logits_to_keep", 7, [], [0]))
    if "per_layer_inputs" not in ins:
        return model_like(g, decoder)
    b, s, layers, p = _dims(ins["per_layer_inputs"])
    inner = "genai/per_layer_inputs"
    _rename_all(g, lambda x: inner if x == "per_layer_inputs" else x)
    reshape = helper.make_node("Reshape", ["per_layer_inputs", "genai/ple_shape"], [inner], name="genai/ple_reshape")
    g.initializer.append(helper.make_tensor("genai/ple_shape", 7, [4], [0, 0, layers, p]))
    g.node.insert(0, reshape)
    flat = helper.make_tensor_value_info("per_layer_inputs", ins["per_layer_inputs"].type.tensor_type.elem_type,
                                         [b, s, layers * p])
    g.input[[i.name for i in g.input].index("per_layer_inputs")].CopyFrom(flat)
    return model_like(g, decoder)


def processor_configs(hf_cfg: dict, processor: dict, vision: bool, audio: bool) -> dict[str, dict]:
    """{file name: onnxruntime-extensions processor config} for genai's Gemma4MultiModalProcessor, from the
    checkpoint's config.json and processor_config.json (`processor`; transformers' defaults where it has none): the
    image pipeline (DecodeImage -> Gemma4ImageTransform: aspect-preserving resize to at most max_soft_tokens, 16-pixel
    patches, position ids, the soft-token count) and the audio one (AudioDecoder -> Gemma4LogMel, the log-mel of
    transformers' Gemma4AudioFeatureExtractor)."""
    out = {}
    if vision:
        v, ip = hf_cfg.get("vision_config") or {}, processor.get("image_processor") or {}
        out[IMAGE_PROCESSOR] = {"processor": {"name": "gemma_4_image_processing", "transforms": [
            {"operation": {"name": "decode_image", "type": "DecodeImage", "attrs": {"color_space": "RGB"}}},
            {"operation": {"name": "gemma4_image_transform", "type": "Gemma4ImageTransform", "attrs": {
                "patch_size": int(ip.get("patch_size") or v.get("patch_size", 16)),
                "max_soft_tokens": int(ip.get("max_soft_tokens") or processor.get("image_seq_length") or 280),
                "pooling_kernel_size": int(ip.get("pooling_kernel_size") or v.get("pooling_kernel_size", 3))}}}]}}
    if audio:
        fe = processor.get("feature_extractor") or {}
        sr = int(fe.get("sampling_rate", 16000))
        attrs = {"feature_size": int(fe.get("feature_size", 128)), "sampling_rate": sr,
                 "frame_length_ms": 1000.0 * fe.get("frame_length", 320) / sr,
                 "hop_length_ms": 1000.0 * fe.get("hop_length", 160) / sr,
                 "min_frequency": float(fe.get("min_frequency", 0.0)),
                 "max_frequency": float(fe.get("max_frequency", 8000.0)),
                 "preemphasis": float(fe.get("preemphasis", 0.0)),
                 "preemphasis_htk_flavor": int(bool(fe.get("preemphasis_htk_flavor", True))),
                 "fft_overdrive": int(bool(fe.get("fft_overdrive", False))),
                 "mel_floor": float(fe.get("mel_floor", 0.001))}
        for k in ("per_bin_mean", "per_bin_stddev"):
            if fe.get(k) is not None:
                attrs[k] = [float(x) for x in fe[k]]
        out[AUDIO_PROCESSOR] = {"feature_extraction": {"sequence": [
            {"operation": {"name": "audio_decoder", "type": "AudioDecoder"}},
            {"operation": {"name": "gemma4_log_mel", "type": "Gemma4LogMel", "attrs": attrs}}]}}
    return out


def multimodal_config(cfg: dict, hf_cfg: dict, preset: str, vision: str, audio: str | None) -> dict:
    """genai_config.json of type gemma4 over the wrapper graphs and the encoders (`vision`, `audio`: their files
    relative to the directory). The search section and the decoder's cache keys are gemma4_text's
    (onnx.genai_config)."""
    doc = genai_config(cfg, preset)
    m = doc["model"]
    m["type"] = "gemma4"
    files = genai_files(preset)
    dec = m["decoder"]
    dec["filename"] = files[GENAI_DECODER]
    dec["inputs"] = {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                     "position_ids": "position_ids", "past_key_names": dec["inputs"]["past_key_names"],
                     "past_value_names": dec["inputs"]["past_value_names"]}
    if "per_layer_inputs" in cfg["graphs"][DECODER]["inputs"]:
        dec["inputs"]["per_layer_inputs"] = "per_layer_inputs"
    emb_out = {"inputs_embeds": "inputs_embeds"}
    if "per_layer_inputs" in cfg["graphs"][EMBED]["outputs"]:
        emb_out["per_layer_inputs"] = "per_layer_inputs"
    m["embedding"] = {"filename": files[GENAI_EMBED],
                      "inputs": {"input_ids": "input_ids", "image_features": "image_features",
                                 **({"audio_features": "audio_features"} if audio else {})},
                      "outputs": emb_out}
    m["vision"] = {"filename": vision, "config_filename": IMAGE_PROCESSOR,
                   "inputs": {"pixel_values": "pixel_values", "pixel_position_ids": "pixel_position_ids"},
                   "outputs": {"image_features": "image_features"}}
    if not audio:  # genai's default speech config_filename, without a speech model, is refused: no speech at all
        m["speech"] = {"config_filename": ""}
    else:
        m["speech"] = {"filename": audio, "config_filename": AUDIO_PROCESSOR,
                       "inputs": {"audio_embeds": "input_features", "attention_mask": "input_features_mask",
                                  "audio_sizes": "audio_sizes"},
                       "outputs": {"audio_features": "audio_features"}}
    return doc


def write_multimodal(directory: Path | str, preset: str, checkpoint_dir: Path | str | None = None) -> dict | None:
    """In an ONNX directory with a vision encoder for `preset`: write the genai wrapper graphs and processor
    configs (from `checkpoint_dir`'s processor_config.json, else the directory's, else transformers' defaults) and
    return the `gemma4` genai_config (the caller writes it as genai_config.json). None where the directory has no
    vision encoder (genai's gemma4 type always opens one): gemma4_text stays the config."""
    import onnx

    d = Path(directory)
    vision, audio = _encoder_file(d, VISION, preset), _encoder_file(d, AUDIO, preset)
    if vision is None:
        return None
    cfg = json.loads((d / CONFIG_FILE).read_text())["presets"][preset]
    hf_cfg = json.loads((d / "config.json").read_text())
    files, ours = genai_files(preset), graph_files(preset)
    embed = onnx.load(str(d / ours[EMBED]), load_external_data=False)
    decoder = onnx.load(str(d / ours[DECODER]), load_external_data=False)
    graphs = {GENAI_EMBED: embedding_graph(embed, hf_cfg.get("image_token_id"),
                                           hf_cfg.get("audio_token_id") if audio else None, GENAI_EMBED),
              GENAI_DECODER: decoder_graph(decoder, GENAI_DECODER)}
    for part, model in graphs.items():
        path = d / files[part]
        path.unlink(missing_ok=True)  # a hard link from an --into directory's staging: never write through it
        path.write_bytes(model.SerializeToString())
        onnx.checker.check_model(str(path))
    proc = next((p for p in (Path(checkpoint_dir) if checkpoint_dir else None, d) if p is not None
                 and (p / "processor_config.json").is_file()), None)
    processor = json.loads((proc / "processor_config.json").read_text()) if proc else {}
    for fname, doc in processor_configs(hf_cfg, processor, True, audio is not None).items():
        (d / fname).unlink(missing_ok=True)
        (d / fname).write_text(json.dumps(doc, indent=2) + "\n")
    return multimodal_config(cfg, hf_cfg, preset, vision, audio)


def write_genai_config(directory: Path | str, preset: str, checkpoint_dir: Path | str | None = None) -> str:
    """genai_config.json of type gemma4 where the directory has a vision encoder for `preset` (and the wrapper
    graphs and processor configs it names), else leave gemma4_text's. Returns the type written."""
    d = Path(directory)
    doc = write_multimodal(d, preset, checkpoint_dir)
    if doc is None:
        return json.loads((d / "genai_config.json").read_text())["model"]["type"]
    (d / "genai_config.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc["model"]["type"]


__all__ = ["GENAI_DECODER", "GENAI_EMBED", "decoder_graph", "embedding_graph", "genai_files", "multimodal_config",
           "processor_configs", "write_genai_config", "write_multimodal"]
