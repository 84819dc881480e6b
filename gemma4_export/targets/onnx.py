"""ONNX target: the Gemma 4 text model as the graphs transformers.js and onnxruntime-genai load, for onnxruntime.

The directory `<name>-onnx-<preset>/` is laid out as a Hugging Face ONNX repository (the onnx-community form):
- onnx/embed_tokens{suffix}.onnx: input_ids -> inputs_embeds [B, S, H] and, with per-layer embeddings,
  per_layer_inputs [B, S, L, P];
- onnx/decoder_model_merged{suffix}.onnx: inputs_embeds (+ per_layer_inputs), attention_mask, position_ids,
  past_key_values.{i}.key/value for each layer that owns a KV cache, num_logits_to_keep -> logits, present.{i}.*;
- each graph's weights in external data beside it ({name}.onnx_data, then _1, _2, ... past 2 GB per file);
- config.json (the checkpoint's, with a `transformers.js_config` block), generation_config.json, the tokenizer files
  and chat template; genai_config.json for onnxruntime-genai; inference_config.json, which documents the inputs,
  outputs and cache layout for any other application and records how the artifact was made.
The suffix names the preset as transformers.js's `dtype` does: '' fp32, _fp16, _quantized (8-bit), _q4.
Weights stream from the checkpoint into their place in the data files while the graphs are built (onnx_decoder.py
over onnx_ops.py); int8/int4 weights are block-quantized as the plan says, into MatMulNBits (matrices) and
GatherBlockQuantized (lookup tables): by onnxruntime's own quantizer, or, for matrices the calibration has
statistics for, with each block's scale chosen to minimise the importance-weighted error (quant/weighted.py), in the
same layout.
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import Gemma4ExportError
from ..exporter.arch import head_architecture
from ..exporter.checkpoint import Checkpoint, to_f32
from ..exporter.source import ModelSource
from ..exporter.tensors import Tensor as T
from ..exporter.tokenizer import read_tokenizer
from ..quant.plan import Plan
from ..quant.presets import Preset
from ..quant.types import ONNX_TYPES
from . import copy_tokenizer_files
from .registry import Platform, Target, register
from .onnx_decoder import Weights, build_decoder, build_embed, cache_names
from .onnx_ops import OPSET, QUANT_BITS, Graph, WeightFile

CONFIG_FILE, GENAI_FILE, ONNX_DIR = "inference_config.json", "genai_config.json", "onnx"
EMBED, DECODER, SINGLE = "embed_tokens", "decoder_model_merged", "model"
# transformers.js's dtypes; a QAT export is 4-bit blocks like int4's, so it is what dtype "q4" loads
SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_quantized", "int4": "_q4", "q4f16": "_q4f16", "qat": "_q4"}
HALF = {"fp16", "q4f16"}  # presets whose graphs compute in float16 (activations, KV cache, block scales)
DATA_LIMIT = 2_000_000_000  # bytes per external data file (transformers.js in a browser reads each into one buffer)
IR_VERSION = 10  # what onnxruntime 1.20 and later read
BLOCK_BYTES = 32 << 20


def suffix(preset: str) -> str:
    return SUFFIXES.get(preset, f"_{preset}")


def graph_files(preset: str) -> dict[str, str]:
    """{part: path of its .onnx relative to the artifact directory}."""
    return {part: f"{ONNX_DIR}/{part}{suffix(preset)}.onnx" for part in (EMBED, DECODER, SINGLE)}


class ONNXExportError(Gemma4ExportError):
    pass


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ONNXExportError("the ONNX target needs onnx and onnxruntime: pip install 'gemma4-export[onnx]'") \
            from None


def _weights(ck: Checkpoint, plan: Plan) -> Weights:
    entries = plan.by_name()

    def type_of(name: str) -> str:
        e = entries.get(name)
        if e is None or e.dropped:
            raise ONNXExportError(f"the graph needs {name}, which the plan does not keep")
        return e.type

    def blocks(name: str):
        dtype = ck.info(name).dtype

        def gen():
            for _, raw in ck.iter_rows(name, BLOCK_BYTES // 2):  # about BLOCK_BYTES once widened to float32
                yield to_f32(raw, dtype)
        return gen

    def vector(name: str) -> np.ndarray:
        info = ck.info(name)
        return to_f32(ck.raw(name), info.dtype).reshape(-1)

    return Weights(type_of, blocks, vector, ck.text_prefix)


def inference_config(src: ModelSource, plan: Plan) -> dict:
    """What an application needs to drive the graph: names, shapes, the cache layout, tokens, the chat template."""
    a = src.arch
    tok = read_tokenizer(src.directory, a.vocab_size)
    cache, shared = [], []
    for i in range(a.num_layers):
        if a.is_kv_shared(i):
            shared.append({"layer": i, "reads_layer": a.kv_donor(i)})
            continue
        pk, pv, ok, ov = cache_names(i)
        cache.append({"layer": i, "type": a.layer_types[i], "kv_heads": a.layer_kv_heads(i),
                      "head_dim": a.layer_head_dim(i), "past_key": pk, "past_value": pv, "present_key": ok,
                      "present_value": ov,
                      "sliding_window": a.sliding_window if a.layer_types[i] == "sliding_attention" else None})
    meta = {"version": __version__, "preset": plan.preset, "target": "onnx", "source": src.name,
            "ple_type": plan.ple_type, "overrides": plan.overrides}
    # name, hub id, base and adapter; never a local path (ModelSource.provenance)
    meta.update({k: v for k, v in src.provenance().items() if k != "name"})
    files = graph_files(plan.preset)
    ft = "float16" if plan.preset in HALF else "float32"
    embeds = {"dtype": ft, "shape": ["batch_size", "sequence", a.hidden_size],
              "doc": "the token embeddings scaled by sqrt(hidden_size)"}
    per_layer = {"dtype": ft, "shape": ["batch_size", "sequence", a.num_layers, a.ple_dim],
                 "doc": "the per-layer table's rows scaled by sqrt(per-layer dim); the decoder adds the projection"}
    embed_out = {"inputs_embeds": embeds, **({"per_layer_inputs": per_layer} if a.has_ple else {})}
    return {
        "graphs": {
            EMBED: {"file": files[EMBED], "inputs": {"input_ids": {"dtype": "int64", "shape": ["batch_size", "sequence"]}},
                    "outputs": embed_out},
            DECODER: {
                "file": files[DECODER],
                "inputs": {
                    **embed_out,
                    "attention_mask": {"dtype": "int64", "shape": ["batch_size", "past_sequence + sequence"],
                                       "doc": "1 for real tokens, 0 for padding, over the cached and the new tokens"},
                    "position_ids": {"dtype": "int64", "shape": ["batch_size", "sequence"],
                                     "doc": "positions of the new tokens (past_sequence + 0, 1, ...; shift for left "
                                            "padding)"},
                    "num_logits_to_keep": {"dtype": "int64", "shape": [],
                                           "doc": "logits for the last n positions only; 0 for every position"},
                },
                "outputs": {"logits": {"dtype": "float32", "shape": ["batch_size", "num_logits_to_keep or sequence",
                                                                      a.vocab_size],
                                       "doc": "after final softcapping"}},
            },
        },
        "opset": OPSET,
        "kv_cache": {
            "dtype": ft,
            "layout": ["batch_size", "kv_heads", "sequence", "head_dim"],
            "doc": "feed each present.* output back as the matching past_key_values.* input; start with sequence 0. "
                   "Every layer keeps its whole history; sliding layers mask it to their window.",
            "layers": cache,
            "kv_shared_layers": shared,
        },
        "vocab_size": a.vocab_size,
        "hidden_size": a.hidden_size,
        "num_attention_heads": a.num_heads,
        "context_length": a.max_position_embeddings,
        "bos_token_id": tok.bos_id,
        "eos_token_ids": list(tok.eos_ids),
        "pad_token_id": tok.pad_id,
        "add_bos": tok.add_bos,
        "chat_template": tok.chat_template,
        "quantization": {"method": "onnxruntime MatMulNBits / GatherBlockQuantized", "block_size": 32,
                         "symmetric": True} if any(e.type in QUANT_BITS for e in plan.kept) else None,
        "gemma4_export": meta,
    }


def _existing_presets(directory: Path | str) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())["presets"]


def check_into(directory: Path | str, preset: str, digest: str | None, force: bool) -> None:
    """Before a preset's graphs join an existing ONNX directory: it was written by gemma4-export from the same
    checkpoint (same weights digest) and holds no graphs of this preset (unless `force`)."""
    d = Path(directory)
    from ..validate.onnxrt import read_config

    try:
        presets = _existing_presets(d)
        read_config(d / graph_files(next(iter(presets)))[DECODER])
    except (OSError, ValueError, KeyError, StopIteration, Gemma4ExportError):
        raise ONNXExportError(f"--into {d}: not an ONNX directory written by gemma4-export") from None
    theirs = {c["gemma4_export"].get("source_digest") for c in presets.values()}
    if theirs != {digest}:
        raise ONNXExportError(f"--into {d}: its graphs were exported from other weights ({', '.join(map(str, theirs))};"
                              f" this checkpoint's are {digest}): a directory holds one model's graphs")
    if preset in presets and not force:
        raise ONNXExportError(f"--into {d}: it already holds {preset} graphs (pass --force to replace them)")
    same = [q for q in presets if q != preset and SUFFIXES.get(q) == SUFFIXES.get(preset)]
    if same:
        raise ONNXExportError(f"--into {d}: its {same[0]} graphs have the file names {preset}'s would take "
                              f"(transformers.js's dtype suffix {SUFFIXES.get(preset)!r}); export {preset} into a "
                              "directory of its own")


def link_other_presets(directory: Path | str, staging: Path, preset: str) -> None:
    """Hard-link the other presets' graphs and data of `directory` into the staging directory that replaces it when
    the export completes. Nothing in the existing directory is written to: an interrupted export leaves it as it
    was."""
    import os
    import shutil

    d = Path(directory)
    from .onnx_genai import genai_files
    from .onnx_towers import encoder_files

    mine = set(graph_files(preset).values()) | {f"{ONNX_DIR}/{f}" for f in encoder_files(preset).values()} | \
        set(genai_files(preset).values())
    (staging / ONNX_DIR).mkdir(exist_ok=True)
    for f in sorted((d / ONNX_DIR).iterdir()):
        rel = f"{ONNX_DIR}/{f.name}"
        if any(rel == m or rel.startswith(m + "_data") for m in mine):
            continue
        try:
            os.link(f, staging / rel)
        except OSError:  # another file system: a copy
            shutil.copy2(f, staging / rel)


def hf_config(checkpoint_dir: Path, data_files: dict[str, int], towers: bool = False) -> dict:
    """config.json as transformers.js reads a Gemma 4 ONNX repository: model_type gemma4 with the text model's
    config nested as text_config (model_type gemma4_text), architectures Gemma4ForConditionalGeneration (the class
    whose text sessions are embed_tokens + decoder_model_merged), and which graphs have external data in how many
    files. A text-only checkpoint (Gemma4ForCausalLM, a flat gemma4_text config) is nested; the unified model's
    config (gemma4_unified, which transformers.js does not map) is given the gemma4 type its text model runs as.
    The towers' configs stay only where their encoders were written (`towers`)."""
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    if cfg.get("model_type") == "gemma4_text":
        text = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers.js_config")}
        cfg = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text,
               **{k: cfg[k] for k in ("tie_word_embeddings", "dtype", "transformers_version") if k in cfg}}
    elif cfg.get("model_type") != "gemma4" or head_architecture(cfg) != "Gemma4ForConditionalGeneration":
        cfg = {k: v for k, v in cfg.items() if k not in ("vision_config", "audio_config")}
        cfg["model_type"] = "gemma4"
        cfg["text_config"] = dict(cfg.get("text_config") or {}, model_type="gemma4_text")
    cfg["architectures"] = ["Gemma4ForConditionalGeneration"]  # the unified model's and a base class's save too
    if not towers:
        cfg = {k: v for k, v in cfg.items() if k not in ("vision_config", "audio_config")}
    tjs = dict(cfg.get("transformers.js_config") or {})
    ext = tjs.get("use_external_data_format")
    ext = dict(ext) if isinstance(ext, dict) else {}
    ext.update(data_files)
    tjs["use_external_data_format"] = ext
    cfg["transformers.js_config"] = tjs
    return cfg


def genai_config(cfg: dict, preset: str) -> dict:
    """genai_config.json for onnxruntime-genai: type gemma4_text over the single graph (input_ids -> logits). Its
    schema is strict (an unknown key is an error). The cache layers are found by their input names and each one's
    head count and size read from the graph's fixed dimensions (the first cache layer's are the fallback values);
    num_hidden_layers is the number of layers that own a cache. The sliding window is masked inside the graph and
    every layer keeps its whole history, so no sliding_window section, and past and present are separate buffers."""
    layers = cfg["kv_cache"]["layers"]
    return {
        "model": {
            "type": "gemma4_text",
            "bos_token_id": cfg["bos_token_id"],
            "eos_token_id": cfg["eos_token_ids"],
            "pad_token_id": cfg["pad_token_id"] if cfg["pad_token_id"] is not None else cfg["eos_token_ids"][0],
            "vocab_size": cfg["vocab_size"],
            "context_length": cfg["context_length"],
            "decoder": {
                "filename": graph_files(preset)[SINGLE],
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": cfg["hidden_size"],
                "num_attention_heads": cfg["num_attention_heads"],
                "num_key_value_heads": layers[0]["kv_heads"],
                "head_size": layers[0]["head_dim"],
                "num_hidden_layers": len(layers),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": cfg["context_length"],
                   "min_length": 0, "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0},
    }


def tokenizer_config_with_template(directory: Path) -> None:
    """transformers.js's apply_chat_template reads tokenizer_config.json's chat_template (chat_template.jinja is read
    only by its processor): put the checkpoint's template there too, where it is not already."""
    tc, jinja = directory / "tokenizer_config.json", directory / "chat_template.jinja"
    if not (tc.is_file() and jinja.is_file()):
        return
    cfg = json.loads(tc.read_text())
    if not cfg.get("chat_template"):
        cfg["chat_template"] = jinja.read_text()
        tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def single_graph(embed, decoder, name: str):
    """One graph input_ids -> logits, the embedding graph feeding the decoder, for runtimes that take a decoder
    with input_ids (onnxruntime-genai's gemma4_text). Its initializers keep their external data entries, so it
    reads the two graphs' own data files: a second graph over the same weights, not a second copy of them."""
    from onnx import helper

    links = {o.name for o in embed.graph.output}
    outer = {i.name for i in embed.graph.input} | links

    def rename(n: str) -> str:
        return n if not n or n in outer else f"embed/{n}"

    nodes = []
    for n in embed.graph.node:
        m = type(n)()
        m.CopyFrom(n)
        m.name = f"embed/{n.name}"
        m.input[:] = [rename(x) for x in n.input]
        m.output[:] = [rename(x) for x in n.output]
        nodes.append(m)
    inits = []
    for t in embed.graph.initializer:
        c = type(t)()
        c.CopyFrom(t)
        c.name = rename(t.name)
        inits.append(c)
    inputs = list(embed.graph.input) + [i for i in decoder.graph.input if i.name not in links]
    graph = helper.make_graph(nodes + list(decoder.graph.node), name, inputs, list(decoder.graph.output),
                              initializer=inits + list(decoder.graph.initializer))
    return model_like(graph, decoder)


def model_like(graph, like):
    """A model of `graph` with `like`'s opsets, producer, IR version and metadata (a graph made over another's)."""
    from onnx import helper

    model = helper.make_model(graph, opset_imports=list(like.opset_import), producer_name=like.producer_name,
                              producer_version=like.producer_version)
    model.ir_version = like.ir_version
    model.metadata_props.extend(like.metadata_props)
    return model


def _model(g: Graph, src: ModelSource, plan: Plan, part: str):
    from onnx import helper

    graph = helper.make_graph(g.nodes, f"{src.name}-{part}", g.inputs, g.outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="gemma4-export", producer_version=__version__)
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"gemma4_export.preset": plan.preset, "gemma4_export.source": src.name})
    return model


@register
class ONNXTarget(Target):
    name = "onnx"
    description = "a directory with an ONNX decoder graph (KV cache) for onnxruntime"
    runtime_name = "onnxruntime"
    extra = "onnx"
    types = ONNX_TYPES
    default_preset = "int4"
    artifact_kind = "directory"
    color = "#2ca02c"
    devices_help = "cpu, cuda (CUDA provider) or mps (CoreML)"
    lattice_type = "INT4"
    lattice_form = "4-bit blocks of 32: scale = step, zero point 8"

    def require(self) -> None:
        _require_onnx()

    def artifact_name(self, source: str, preset: Preset, group_size: int | None = None) -> str:
        return f"{source}-onnx-{preset.name}"

    def write(self, job) -> None:
        t0 = time.perf_counter()
        tmp, plan, src = job.path, job.plan, job.source
        (tmp / ONNX_DIR).mkdir(exist_ok=True)
        files = graph_files(plan.preset)
        weights = _weights(job.checkpoint, plan)
        # the tied head is the embedding table again, in the decoder's own data
        total = plan.total_bytes + (plan.by_name()[weights.name(T.TOKEN_EMBD)].bytes
                                    if src.arch.tie_word_embeddings else 0)
        quantized, data_files, models = [], {}, {}
        with job.reporter.task(f"export {plan.preset} (onnx)", total) as task:
            media = tuple(src.config[k] for k in ("image_token_id", "audio_token_id", "video_token_id")
                          if isinstance(src.config.get(k), int))
            embed = functools.partial(build_embed, media_ids=media)
            for part, build in ((EMBED, embed), (DECODER, functools.partial(build_decoder, split=True))):
                path = tmp / files[part]
                wf = WeightFile(str(path.parent), path.name + "_data", DATA_LIMIT)
                try:
                    # In a 4-bit model, its 8-bit weights (head, PLE projections) run with int8 activations: ~100x
                    # faster on CPU, and the measured KLD is unchanged at the int4 level (tiny-e2b 0.00263 ->
                    # 0.00264). The int8 preset keeps float32 activations: there they cost 2-3x its KLD.
                    g = Graph(wf, advance=task.advance, int8_activations=any(e.type == "INT4" for e in plan.kept),
                              half=plan.preset in HALF,
                              lattice=frozenset(e.name for e in plan.kept if e.method == "lattice"))
                    if job.importance is not None:
                        g.importance = lambda name: job.importance.for_tensor(name, job.checkpoint.text_prefix)
                        g.hessian = lambda name: job.importance.hessian_for(name, job.checkpoint.text_prefix)
                    build(g, src.arch, weights)
                finally:
                    wf.close()
                models[part] = _model(g, src, plan, part)
                path.write_bytes(models[part].SerializeToString())
                _check_model(path)
                quantized += g.quantized
                data_files[path.name] = len(wf.files)
        single = tmp / files[SINGLE]
        single.write_bytes(single_graph(models[EMBED], models[DECODER], f"{src.name}-{SINGLE}").SerializeToString())
        _check_model(single)
        job.seconds["weights"] = time.perf_counter() - t0
        check_quantized(quantized, plan)
        cfg = inference_config(src, plan)
        towers = False
        if job.tower_plan is not None:
            from .onnx_towers import ENCODER_PRESET, export_encoders_timed

            t1 = time.perf_counter()
            enc = export_encoders_timed(job.checkpoint.dir, tmp / ONNX_DIR, ENCODER_PRESET[plan.preset],
                                        file_preset=plan.preset)
            job.seconds["encoders"] = time.perf_counter() - t1
            cfg["encoders"] = {part: {"file": f"{ONNX_DIR}/{p.name}", "preset": ENCODER_PRESET[plan.preset]}
                               for part, p in enc.paths.items()}
            data_files.update({p.name: 1 for p in enc.paths.values() if Path(f"{p}_data").is_file()})
            towers = True
        into = job.options.get("into")  # an existing directory this preset's graphs join (the others are kept)
        presets = dict(_existing_presets(into) if into else {})
        presets[plan.preset] = cfg
        doc = {"format": "gemma4-export onnx (transformers.js layout)", "presets": presets}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / GENAI_FILE).write_text(json.dumps(genai_config(cfg, plan.preset), indent=2) + "\n")
        copy_tokenizer_files(job.checkpoint.dir, tmp)
        tokenizer_config_with_template(tmp)
        if into:  # the other presets' data files stay declared
            old = json.loads((Path(into) / "config.json").read_text()).get("transformers.js_config", {})
            data_files = {**old.get("use_external_data_format", {}), **data_files}
        if into:
            towers = towers or any("encoders" in c for c in presets.values())
        (tmp / "config.json").write_text(json.dumps(hf_config(job.checkpoint.dir, data_files, towers), indent=2)
                                         + "\n")
        if towers:  # onnxruntime-genai's multimodal gemma4 pipeline over the encoders (else gemma4_text stays)
            from .onnx_genai import write_genai_config

            write_genai_config(tmp, plan.preset, job.checkpoint.dir)

    towers_kind = "inside"

    def tower_policy(self, choice: str | None, preset: Preset):
        from ..quant.rules import TowerPolicy
        from .onnx_towers import ENCODER_PRESET

        if choice is not None:
            raise ONNXExportError("the ONNX encoders' type follows the preset (fp32, fp16, or 8-bit beside 4- and "
                                  "8-bit text): there is no tower type to choose")
        enc = ENCODER_PRESET[preset.name]
        # int8: 8-bit MatMulNBits blocks for every MatMul with a 2-D weight (the patch embedding is one)
        matrix = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}[enc]
        return TowerPolicy(f"encoders-{enc}", matrix, "FP16" if enc == "fp16" else "FP32", matrix)

    def check_towers(self, config: dict) -> None:
        if not (config.get("vision_config") or config.get("audio_config")):
            raise ONNXExportError("this checkpoint has no vision or audio tower")
        if head_architecture(config) != "Gemma4ForConditionalGeneration":
            raise ONNXExportError(f"{(config.get('architectures') or ['?'])[0]}'s embedders have no ONNX encoder "
                                  "form yet (transformers.js has no model for them)")

    def tower_note(self, config: dict) -> str | None:
        if config.get("vision_config") and not config.get("audio_config"):
            # transformers.js 4.3's session list for Gemma4ForConditionalGeneration always names audio_encoder
            return ("transformers.js (4.3) loads Gemma4ForConditionalGeneration only with an onnx/audio_encoder, "
                    "which a model without an audio tower has not: there it runs the text (Gemma4ForCausalLM); "
                    "the vision encoder runs in onnxruntime, as validation does")
        return None

    def tower_runner(self, artifact: Path, towers: Path | None, device: str, src):
        from ..validate.onnxrt import read_config
        from .onnx_towers import EncoderTowerRunner

        cfg = read_config(artifact)
        if "encoders" not in cfg:
            return None
        return EncoderTowerRunner(artifact, src.checkpoint.dir, cfg["gemma4_export"]["preset"], device)

    def recognises(self, path: Path) -> bool:
        return (path.is_file() and path.suffix == ".onnx") or \
            (path.is_dir() and ((path / CONFIG_FILE).is_file() or any((path / ONNX_DIR).glob("*.onnx"))))

    def artifact_info(self, path: Path):
        from ..validate.onnxrt import artifact_info

        return artifact_info(path)

    def make_runner(self, path: Path, spec, device: str, preset: str):
        from ..validate.onnxrt import make_runner

        return make_runner(path, spec, device, preset)

    def runtime_checks(self, runner, prompt_ids, n):
        from ..validate.onnxrt import runtime_checks

        return runtime_checks(runner, prompt_ids, n)

    def probe(self) -> dict | None:
        import onnxruntime

        return {"providers": tuple(onnxruntime.get_available_providers())}

    def skip_reason(self, device: str, platform: Platform) -> str | None:
        from ..validate.onnxrt import PROVIDERS

        facts = platform.runtime(self.name)
        if facts is None:
            return self.not_installed()
        want = PROVIDERS[device]
        if want not in facts["providers"]:
            return f"onnxruntime here has no {want} (it has {', '.join(facts['providers']) or 'none'})"
        return None

    def backend(self, device: str) -> str:
        from ..validate.onnxrt import PROVIDERS

        return f"onnxruntime, {PROVIDERS[device]}"


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ONNXExportError(f"the written graph is not valid ONNX: {e}") from None


def quantized_weights(model) -> dict[str, tuple[str, int]]:
    """{(checkpoint tensor name, operator): bits} for every block-quantized weight of a model proto, If branches
    included (an expert's weights are views named '<tensor>.expert<e>')."""
    out = {}

    def walk(nodes):
        for n in nodes:
            for attr in n.attribute:
                if attr.g.node:
                    walk(attr.g.node)
            if n.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
                continue
            bits = next(a.i for a in n.attribute if a.name == "bits")
            data = n.input[1] if n.op_type == "MatMulNBits" else n.input[0]
            name = re.sub(r"\.expert\d+$", "", data.removesuffix(f".q{bits}").removesuffix(".head"))
            out[(name, n.op_type)] = bits

    walk(model.graph.node)
    return out


def check_quantized(nodes, plan: Plan) -> None:
    """Every quantized weight in the graph has the plan's type, and every weight the plan quantizes is quantized."""
    got = {q.source: q.bits for q in nodes}
    want = {e.name: QUANT_BITS[e.type] for e in plan.kept if e.type in QUANT_BITS}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise ONNXExportError(f"quantized weights differ from the plan: {diff[:6]}")
