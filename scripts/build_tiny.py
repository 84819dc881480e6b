"""Build the shipped tiny Gemma 4 checkpoints: corpus, tokenizer, configs, training, and the on-disk layout.

    python scripts/build_tiny.py            # rebuild all four into gemma4_export/tiny/checkpoints
    python scripts/build_tiny.py --only tiny-e2b --steps 300

Every tiny model is built from transformers' own Gemma 4 classes (so it loads in transformers unchanged), trained
on a fixed slice of Python's standard-library sources that ships with the package (tiny/corpus), then saved the way
the hub checkpoints are: the multimodal class with `model.language_model.` names, small vision/audio towers
(trained apart, with --towers, to name what code-made images and clips hold), tied embeddings, bf16 safetensors, the
unused k/v weights of KV-shared layers kept in the file, a hub-form config.json, tokenizer files with Gemma 4's
special tokens and chat template. Seeds are fixed and training is
single-threaded per step order, so a rebuild on the same versions gives the same weights.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import math
import random
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

# A development script, not part of the installed package: it writes into the package's tiny/ folder. The training
# text sits beside this script; the held-out text ships with the package, since validation scores on it.
PACKAGE_TINY = Path(__file__).resolve().parent.parent / "gemma4_export" / "tiny"
CORPUS_DIRS = {"train": Path(__file__).resolve().parent / "tiny_corpus", "heldout": PACKAGE_TINY / "corpus"}
OUT_DIR = PACKAGE_TINY / "checkpoints"
VOCAB_SIZE = 1024
S, F = "sliding_attention", "full_attention"

# ---- corpus ----------------------------------------------------------------------------------------------------

TRAIN_MODULES = (
    "_collections_abc", "argparse", "base64", "bisect", "calendar", "cmd", "codecs", "colorsys", "contextlib", "copy",
    "csv", "dataclasses", "difflib", "enum", "fileinput", "fnmatch", "fractions", "functools", "genericpath",
    "getopt", "glob", "gzip", "hashlib", "heapq", "hmac", "keyword", "linecache", "numbers", "operator", "optparse",
    "os", "posixpath", "pprint", "queue", "random", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil",
    "statistics", "string", "struct", "tempfile", "textwrap", "threading", "tokenize", "types", "uuid", "warnings",
    "weakref",
)
HELDOUT_MODULES = ("abc", "bz2", "lzma", "graphlib", "timeit", "stat", "token", "nturl2path", "this", "wave")


def make_corpus() -> None:
    """Write the corpus files from this Python's standard library (run once; the result is committed)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name, mods in (("train", TRAIN_MODULES), ("heldout", HELDOUT_MODULES)):
        CORPUS_DIRS[name].mkdir(parents=True, exist_ok=True)
        parts = [f"# file: {m}.py\n" + (lib / f"{m}.py").read_text(encoding="utf-8") for m in mods]
        with gzip.GzipFile(CORPUS_DIRS[name] / f"{name}.txt.gz", "wb", mtime=0) as f:
            f.write("\n".join(parts).encode("utf-8"))


def read_corpus(name: str) -> str:
    with gzip.open(CORPUS_DIRS[name] / f"{name}.txt.gz", "rb") as f:
        return f.read().decode("utf-8")


def chat_samples(text: str, limit: int = 4000) -> list[list[dict[str, str]]]:
    """Conversations made from the corpus: the user gives a function's signature and docstring summary, the model
    answers with the function's source. They teach the tiny models Gemma 4's turn format."""
    out = []
    for chunk in text.split("# file: ")[1:]:
        try:
            tree = ast.parse(chunk.split("\n", 1)[1])
        except SyntaxError:
            continue
        src = chunk.split("\n", 1)[1]
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.body:
                seg = ast.get_source_segment(src, node)
                if not seg or len(seg) > 900:
                    continue
                doc = (ast.get_docstring(node) or "").strip().split("\n")[0]
                ask = f"Write the Python function {node.name}." + (f" {doc}" if doc else "")
                out.append([{"role": "user", "content": ask}, {"role": "assistant", "content": seg}])
    random.Random(0).shuffle(out)
    return out[:limit]


# ---- tokenizer -------------------------------------------------------------------------------------------------

# Gemma 4's special tokens at their published ids; the rest of ids 0..107 are <unused*> as in the real vocabulary.
SPECIAL_IDS = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>",
}
NEWLINE_ID = 107
# Multimodal markers sit at the end of the tiny vocabulary (ids 255999.. in the real one), same order.
MM_TOKENS = ("<|image>", "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>", "<|video|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model\n{%- endif -%}"
)


def train_tokenizer(text: str):
    """A BPE with byte fallback in Gemma 4's shape: spaces become '▁', merges never cross a newline, bytes outside
    the learned alphabet fall back to <0xNN> tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    fixed = [SPECIAL_IDS.get(i, f"<unused{i}>") for i in range(NEWLINE_ID)] + ["\n"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    n_learned = VOCAB_SIZE - len(fixed) - len(byte_tokens) - len(MM_TOKENS)

    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    probe.normalizer = normalizers.Replace(" ", "▁")
    probe.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="removed")
    alphabet = [chr(c) for c in range(33, 127)] + ["▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned, initial_alphabet=alphabet, limit_alphabet=len(alphabet), special_tokens=[],
        show_progress=False,
    )
    probe.train_from_iterator([text], trainer=trainer)
    learned = json.loads(probe.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    vocab: dict[str, int] = {}
    for tok in fixed + byte_tokens + pieces + list(MM_TOKENS):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    assert len(vocab) <= VOCAB_SIZE, len(vocab)
    k = 0
    while len(vocab) < VOCAB_SIZE:  # pad to the exact size if the trainer stopped early
        vocab.setdefault(f"<unused_pad{k}>", len(vocab))
        k += 1
    # keep the multimodal markers as the last ids
    for j, t in enumerate(MM_TOKENS):
        vocab.pop(t)
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    vocab = {t: i for i, (t, _) in enumerate(items)}
    for t in MM_TOKENS:
        vocab[t] = len(vocab)
    assert len(vocab) == VOCAB_SIZE

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    from tokenizers import AddedToken

    control = [t for t in fixed if t.startswith("<") and t != "\n"] + list(MM_TOKENS)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


# The media token strings Gemma4Processor (transformers and transformers.js) reads from tokenizer_config.json.
MEDIA_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}


def processor_files(config: dict[str, Any]) -> dict[str, dict]:
    """processor_config.json as Gemma4Processor.save_pretrained writes it for this config (the published
    checkpoints' settings): the image processor with the tower's patch and pooling sizes, and the audio feature
    extractor. Its mel-bin count is the audio tower's first convolution width, which transformers' tower takes as the
    input width (128 in every published model; the tiny tower's 16)."""
    vision = config.get("vision_config") or {}
    audio = config.get("audio_config") or {}
    if config.get("model_type") == "gemma4_unified":  # encoder-free: raw patches and raw waveform frames
        image = {"image_processor_type": "Gemma4UnifiedImageProcessor", "patch_size": vision.get("patch_size", 16),
                 "max_soft_tokens": 280, "pooling_kernel_size": vision.get("pooling_kernel_size", 3), "resample": 3,
                 "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": False, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}
        frame = audio.get("audio_embed_dim", 640)
        features = {"feature_extractor_type": "Gemma4UnifiedAudioFeatureExtractor", "feature_size": frame,
                    "sampling_rate": 16000, "padding_value": 0.0, "padding_side": "right",
                    "return_attention_mask": True, "audio_samples_per_token": frame}
        return {"processor_config.json": {"processor_class": "Gemma4UnifiedProcessor", "image_seq_length": 280,
                                          "audio_seq_length": 750, "audio_ms_per_token": 40,
                                          "image_processor": image, "feature_extractor": features}}
    image = {"image_processor_type": "Gemma4ImageProcessor", "patch_size": vision.get("patch_size", 16),
             "max_soft_tokens": 280, "pooling_kernel_size": vision.get("pooling_kernel_size", 3), "resample": 3,
             "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": False, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}
    mel = (audio.get("subsampling_conv_channels") or [128])[0]
    features = {"feature_extractor_type": "Gemma4AudioFeatureExtractor", "feature_size": mel, "sampling_rate": 16000,
                "padding_value": 0.0, "padding_side": "right", "return_attention_mask": True, "min_frequency": 0.0,
                "max_frequency": 8000.0, "preemphasis": 0.0, "preemphasis_htk_flavor": True, "fft_overdrive": False,
                "dither": 0.0, "input_scale_factor": 1.0, "frame_length": 320, "hop_length": 160, "fft_length": 512,
                "mel_floor": 0.001, "per_bin_mean": None, "per_bin_stddev": None}
    proc = {"processor_class": "Gemma4Processor", "image_seq_length": 280, "audio_seq_length": 750,
            "audio_ms_per_token": 40, "image_processor": image, "feature_extractor": features}
    return {"processor_config.json": proc}


def write_processor(out: Path) -> None:
    """Write the processor files of the checkpoint in `out` and add the media token strings to its tokenizer
    config (kept otherwise as it is), for a checkpoint with towers."""
    config = json.loads((out / "config.json").read_text())
    if not (config.get("vision_config") or config.get("audio_config")):
        return
    for name, body in processor_files(config).items():
        (out / name).write_text(json.dumps(body, indent=2) + "\n")
    tc = out / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    cfg.update(MEDIA_TOKENS)
    tc.write_text(json.dumps(cfg, indent=2) + "\n")


def write_tokenizer(tok, out: Path, instruction_tuned: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": False,  # the chat template adds <bos>, as in Gemma 4's published tokenizer_config
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "model_max_length": 8192,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    cfg.update(MEDIA_TOKENS)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    gen = {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106, 50] if instruction_tuned else 1,
           "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ---- configs ---------------------------------------------------------------------------------------------------

ROPE = {S: {"rope_type": "default", "rope_theta": 10000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}


def _mm_ids(vocab: int) -> dict[str, int]:
    ids = {t: vocab - len(MM_TOKENS) + i for i, t in enumerate(MM_TOKENS)}
    return {"boi_token_id": ids["<|image>"], "boa_token_id": ids["<|audio>"], "image_token_id": ids["<|image|>"],
            "audio_token_id": ids["<|audio|>"], "eoi_token_id": ids["<image|>"], "eoa_token_index": ids["<audio|>"],
            "video_token_id": ids["<|video|>"]}


def _text(**kw) -> dict[str, Any]:
    t = dict(
        model_type="gemma4_text", vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=None,
        attention_k_eq_v=False, sliding_window=64, max_position_embeddings=8192, num_kv_shared_layers=0,
        use_double_wide_mlp=False, rope_parameters=ROPE, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
        pad_token_id=0, attention_bias=False, attention_dropout=0.0, use_bidirectional_attention=None,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB_SIZE, enable_moe_block=False,
        num_experts=None, top_k_experts=None, moe_intermediate_size=None, dtype="bfloat16",
    )
    t.update(kw)
    t["num_hidden_layers"] = len(t["layer_types"])
    return t


TINY_VISION = dict(model_type="gemma4_vision", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=32, patch_size=16, pooling_kernel_size=3,
                   position_embedding_size=256, use_clipped_linears=True, standardize=False)
TINY_AUDIO = dict(model_type="gemma4_audio", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  subsampling_conv_channels=[128, 8], output_proj_dims=64)


def tiny_configs() -> dict[str, dict[str, Any]]:
    """Each tiny variant keeps its family's features at the smallest sizes where every quantizable row length is
    still a multiple of 256."""
    mm = _mm_ids(VOCAB_SIZE)
    common = dict(tie_word_embeddings=True, dtype="bfloat16", transformers_version="5.5.0", **mm)
    sswa = [S] * 5 + [F]
    return {
        # E2B: PLE, KV sharing (layers 5-9 reuse 3 and 4), double-wide MLP on the shared layers, 4:1 pattern.
        "tiny-e2b": dict(
            architectures=["Gemma4ForConditionalGeneration"], model_type="gemma4",
            text_config=_text(layer_types=([S] * 4 + [F]) * 2, num_key_value_heads=1, num_kv_shared_layers=5,
                              use_double_wide_mlp=True, hidden_size_per_layer_input=256),
            vision_config=TINY_VISION, audio_config=TINY_AUDIO, **common),
        # 12B: the unified class (encoder-free vision/audio embedders), K==V with separate global KV heads.
        "tiny-12b": dict(
            architectures=["Gemma4UnifiedForConditionalGeneration"], model_type="gemma4_unified",
            text_config={k: v for k, v in _text(
                model_type="gemma4_unified_text", layer_types=sswa, num_global_key_value_heads=1,
                attention_k_eq_v=True, use_bidirectional_attention="vision").items()
                if k not in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block",
                             "num_experts", "top_k_experts", "moe_intermediate_size")},
            vision_config=dict(model_type="gemma4_unified_vision", mm_embed_dim=64, mm_posemb_size=64,
                               output_proj_dims=64),
            audio_config=dict(model_type="gemma4_unified_audio", audio_embed_dim=640), **common),
        # 26B-A4B: MoE (4 experts, top 2) beside a dense MLP, K==V, separate global KV heads; vision tower only.
        "tiny-26b-a4b": dict(
            architectures=["Gemma4ForConditionalGeneration"], model_type="gemma4",
            text_config=_text(layer_types=sswa, num_global_key_value_heads=1, attention_k_eq_v=True,
                              enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=256,
                              use_bidirectional_attention="vision"),
            vision_config=TINY_VISION, **common),
        # 31B: dense, K==V.
        "tiny-31b": dict(
            architectures=["Gemma4ForConditionalGeneration"], model_type="gemma4",
            text_config=_text(layer_types=sswa, num_global_key_value_heads=1, attention_k_eq_v=True,
                              use_bidirectional_attention="vision"),
            vision_config=TINY_VISION, **common),
    }


# ---- training --------------------------------------------------------------------------------------------------


def encode_corpus(tok, text: str, chats: list) -> np.ndarray:
    """One token stream: source files separated by <eos>, with rendered conversations interleaved."""
    from jinja2 import Template

    tmpl = Template(CHAT_TEMPLATE)
    files = text.split("# file: ")[1:]
    docs = ["# file: " + f for f in files]
    docs += [tmpl.render(messages=c, bos_token="<bos>", add_generation_prompt=False) for c in chats]
    random.Random(1).shuffle(docs)
    ids: list[int] = []
    for d in docs:
        if not d.startswith("<bos>"):
            ids.append(2)
        ids.extend(tok.encode(d, add_special_tokens=False).ids)
        ids.append(1)
    return np.asarray(ids, dtype=np.int64)


def build_model(config: dict[str, Any], seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, config["architectures"][0])
    model = cls(transformers.AutoConfig.for_model(**config))
    model.float()
    return model


def text_logits(model, ids):
    """Logits of the text decoder alone (towers untouched)."""
    return model(input_ids=ids).logits


def train(model, stream: np.ndarray, steps: int, seq: int, batch: int, lr: float, seed: int, log=print) -> float:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for n, p in model.named_parameters() if "language_model" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("language_model" in n)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    ema = None
    t0 = time.time()
    for step in range(steps):
        starts = rng.integers(0, len(stream) - seq - 1, size=batch)
        x = torch.from_numpy(np.stack([stream[s : s + seq + 1] for s in starts]))
        logits = text_logits(model, x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.3f}  ema {ema:.3f}  {time.time() - t0:6.0f}s")
    model.eval()
    return float(ema)


def evaluate(model, tok, heldout: np.ndarray, seq: int = 256, windows: int = 16) -> dict[str, Any]:
    """Held-out loss and mean top-1 probability, and greedy continuations of a few prompts (run twice, to show
    they repeat)."""
    import torch

    model.eval()
    losses, top1p, agree = [], [], []
    with torch.no_grad():
        step = max(1, (len(heldout) - seq - 1) // windows)
        for s in range(0, step * windows, step):
            x = torch.from_numpy(heldout[s : s + seq + 1][None])
            logits = text_logits(model, x[:, :-1]).float()
            probs = logits.softmax(-1)
            losses.append(torch.nn.functional.cross_entropy(logits[0], x[0, 1:]).item())
            top1p.append(probs.max(-1).values.mean().item())
            agree.append((probs.argmax(-1) == x[:, 1:]).float().mean().item())
        prompts = ["def __init__(self", "import os\nimport sys\n\n\ndef ", "    for i in range(",
                   "<bos><|turn>user\nWrite the Python function isdir.<turn|>\n<|turn>model\n"]
        samples = []
        for p in prompts:
            outs = []
            for _ in range(2):
                ids = [2] + tok.encode(p, add_special_tokens=False).ids if not p.startswith("<bos>") else \
                    tok.encode(p, add_special_tokens=False).ids
                x = torch.tensor([ids])
                for _ in range(40):
                    nxt = text_logits(model, x)[0, -1].argmax().item()
                    x = torch.cat([x, torch.tensor([[nxt]])], 1)
                outs.append(tok.decode(x[0, len(ids):].tolist(), skip_special_tokens=False))
            samples.append({"prompt": p, "continuation": outs[0], "repeatable": outs[0] == outs[1]})
    return {
        "heldout_loss": float(np.mean(losses)),
        "heldout_mean_top1_prob": float(np.mean(top1p)),
        "heldout_top1_accuracy": float(np.mean(agree)),
        "samples": samples,
    }


# ---- saving ----------------------------------------------------------------------------------------------------


def save_checkpoint(model, config: dict[str, Any], out: Path, shards: int, seed: int) -> None:
    """Save as the hub does: bf16 safetensors (sharded with an index when shards > 1), no lm_head (tied), the
    KV-shared layers' unused k_proj/v_proj/k_norm present, hub-form config.json."""
    import torch
    from safetensors.torch import save_file

    from gemma4_export.exporter.arch import parse_config
    from gemma4_export.exporter.tensors import Role, expected_text_tensors

    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if not k.startswith("lm_head")}
    arch = parse_config(config)
    g = torch.Generator().manual_seed(seed + 7)
    for spec in expected_text_tensors(arch):
        if spec.role == Role.KV_SHARED_UNUSED and spec.name not in sd:
            if spec.name.endswith("k_norm.weight"):
                sd[spec.name] = torch.ones(spec.shape, dtype=torch.bfloat16)
            else:
                sd[spec.name] = (torch.randn(spec.shape, generator=g) * 0.02).to(torch.bfloat16)
    missing = [s.name for s in expected_text_tensors(arch) if s.name not in sd]
    assert not missing, missing
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    names = sorted(sd)
    meta = {"format": "pt"}
    if shards == 1:
        save_file({n: sd[n] for n in names}, str(out / "model.safetensors"), metadata=meta)
    else:
        per = math.ceil(len(names) / shards)
        weight_map = {}
        total = 0
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i * per : (i + 1) * per]
            save_file({n: sd[n] for n in part}, str(out / fname), metadata=meta)
            weight_map.update({n: fname for n in part})
            total += sum(sd[n].numel() * 2 for n in part)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def build(names: list[str], steps: int, seq: int, batch: int, seed: int = 0, log=print) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = read_corpus("train")
    tok = train_tokenizer(text)
    chats = chat_samples(text)
    stream = encode_corpus(tok, text, chats)
    held = np.asarray(tok.encode(read_corpus("heldout"), add_special_tokens=False).ids, dtype=np.int64)
    log(f"corpus: {len(text):,} chars, {len(chats)} conversations, {len(stream):,} tokens; held-out {len(held):,}")
    report: dict[str, Any] = {}
    configs = tiny_configs()
    for name in names:
        cfg = configs[name]
        log(f"{name}: training {steps} steps of {batch}x{seq} tokens")
        model = build_model(cfg, seed)
        t0 = time.time()
        final = train(model, stream, steps, seq, batch, lr=3e-3, seed=seed, log=log)
        ev = evaluate(model, tok, held)
        out = OUT_DIR / name
        save_checkpoint(model, cfg, out, shards=2 if name == "tiny-26b-a4b" else 1, seed=seed)
        write_tokenizer(tok, out)
        write_processor(out)
        n_params = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n)
        report[name] = {"steps": steps, "seq": seq, "batch": batch, "train_loss_ema": final,
                        "train_seconds": round(time.time() - t0, 1), "text_parameters": n_params, **ev}
        (out / "training.json").write_text(json.dumps(report[name], indent=2) + "\n")
        log(f"{name}: loss {final:.3f}, held-out loss {ev['heldout_loss']:.3f}, "
            f"mean top-1 prob {ev['heldout_mean_top1_prob']:.3f}, top-1 acc {ev['heldout_top1_accuracy']:.3f}")
    return report


# ---- a fine-tune in the layout transformers writes -------------------------------------------------------------

FT_NAME = "tiny-e2b-ft"
FT_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>"]


def _tool_chats(chats: list, n: int = 600) -> list:
    """Conversations whose answers call a tool with the added tokens, as a tool-use fine-tune would teach."""
    out = []
    for c in chats[:n]:
        user, answer = c[0]["content"], c[-1]["content"]
        first = answer.split("\n", 1)[0]
        out.append([{"role": "user", "content": user},
                    {"role": "model", "content": f"{FT_TOKENS[0]}{first}{FT_TOKENS[1]}\n{FT_TOKENS[2]}ok\n{answer}"}])
    return out


def finetune(steps: int, seq: int, batch: int, seed: int = 0, log=print) -> dict[str, Any]:
    """tiny-e2b trained further, with tokens added to its vocabulary, saved by transformers' save_pretrained: the
    layout every fine-tune leaves in (no k/v weights for the KV-shared layers, transformers' config form, the
    tokenizer as transformers writes it), so quantized results on that layout are realistic."""
    import torch
    import transformers

    base = OUT_DIR / "tiny-e2b"
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    tok.add_tokens(FT_TOKENS)
    model.resize_token_embeddings(len(tok))
    backend = tok.backend_tokenizer
    text = read_corpus("train")
    chats = chat_samples(text)
    stream = encode_corpus(backend, text, chats[:2000] + _tool_chats(chats[2000:]))
    held = np.asarray(backend.encode(read_corpus("heldout"), add_special_tokens=False).ids, dtype=np.int64)
    log(f"{FT_NAME}: {len(tok)} tokens ({len(FT_TOKENS)} added); training {steps} steps of {batch}x{seq} tokens")
    t0 = time.time()
    final = train(model, stream, steps, seq, batch, lr=1e-3, seed=seed + 1, log=log)
    ev = evaluate(model, backend, held)
    out = OUT_DIR / FT_NAME
    if out.exists():
        import shutil

        shutil.rmtree(out)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    write_processor(out)
    report = {"base": "tiny-e2b", "added_tokens": FT_TOKENS, "steps": steps, "seq": seq, "batch": batch,
              "train_loss_ema": final, "train_seconds": round(time.time() - t0, 1), **ev}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"{FT_NAME}: loss {final:.3f}, held-out loss {ev['heldout_loss']:.3f}, "
        f"mean top-1 prob {ev['heldout_mean_top1_prob']:.3f}, top-1 acc {ev['heldout_top1_accuracy']:.3f}")
    return report


# ---- quantization-aware training: a tiny QAT release ----------------------------------------------------------

QAT_BASES = {"tiny-e2b-qat": "tiny-e2b", "tiny-26b-a4b-qat": "tiny-26b-a4b"}
QAT_GROUP = 32


def _lattice_parametrization(weight):
    """Fake quantization on a 4-bit lattice, as a QAT pipeline trains for Q4_0: each group of 32 along a row is a
    learned step d (log-parametrised, started at the group's absmax / 8) times an integer in -8..7, with a
    straight-through estimator for the rounding (LSQ: the clamp passes gradients to w inside the range and to d)."""
    import torch

    class Lattice(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            g = w.detach().float().reshape(-1, QAT_GROUP)
            self.log_d = torch.nn.Parameter(g.abs().amax(-1).clamp_min(1e-8).div(8).log())

        def forward(self, w):
            g = w.reshape(-1, QAT_GROUP)
            d = self.log_d.exp()[:, None]
            x = torch.clamp(g / d, -8, 7)
            return ((x + (torch.round(x) - x).detach()) * d).reshape(w.shape)

    return Lattice(weight)


def _qat_targets(model):
    """(module, parameter name) of every decoder-layer weight matrix a QAT release trains on the lattice: attention,
    MLP, the PLE gate and projection, the experts; not the router, norms, embeddings, PLE table or towers."""
    out = []
    for name, mod in model.named_modules():
        if ".language_model.layers." not in f".{name}." or "router" in name:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.ndim >= 2 and p.shape[-1] % QAT_GROUP == 0:
                out.append((mod, pname))
    return out


def qat(name: str, steps: int, seq: int, batch: int, seed: int = 0, log=print) -> dict[str, Any]:
    """A tiny QAT checkpoint: the base tiny model trained further with every decoder weight matrix fake-quantized on
    a 4-bit lattice with learned per-group steps, then saved as Google's `-qat-q4_0-unquantized` releases are: the
    lattice values (d x integer) in bf16, in the base model's hub layout. The steps are learned, so they are not
    Q4_0's absmax / -8 rule: plain Q4_0 recomputes a different step and loses what training bought."""
    import torch
    import transformers
    from torch.nn.utils import parametrize

    base = OUT_DIR / QAT_BASES[name]
    config = json.loads((base / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(base, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(base).backend_tokenizer
    targets = _qat_targets(model)
    for mod, pname in targets:
        parametrize.register_parametrization(mod, pname, _lattice_parametrization(getattr(mod, pname)))
    text = read_corpus("train")
    stream = encode_corpus(tok, text, chat_samples(text))
    held = np.asarray(tok.encode(read_corpus("heldout"), add_special_tokens=False).ids, dtype=np.int64)
    before = evaluate(model, tok, held)
    log(f"{name}: {len(targets)} matrices on the lattice; held-out loss at the start {before['heldout_loss']:.3f}; "
        f"training {steps} steps of {batch}x{seq} tokens")
    t0 = time.time()
    final = train(model, stream, steps, seq, batch, lr=5e-4, seed=seed + 2, log=log)
    ev = evaluate(model, tok, held)
    with torch.no_grad():
        for mod, pname in targets:
            parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
    out = OUT_DIR / name
    save_checkpoint(model, config, out, shards=2 if "26b" in name else 1, seed=seed)
    for f in base.iterdir():
        if f.suffix in (".jinja",) or f.name.startswith(("tokenizer", "generation_config")):
            (out / f.name).write_bytes(f.read_bytes())
    write_processor(out)
    report = {"base": QAT_BASES[name], "lattice": {"group": QAT_GROUP, "levels": "-8..7", "step": "learned per group",
              "matrices": len(targets)}, "steps": steps, "seq": seq, "batch": batch,
              "heldout_loss_at_start": before["heldout_loss"], "train_loss_ema": final,
              "train_seconds": round(time.time() - t0, 1), **ev}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"{name}: loss {final:.3f}, held-out loss {ev['heldout_loss']:.3f} (start {before['heldout_loss']:.3f}), "
        f"top-1 acc {ev['heldout_top1_accuracy']:.3f}")
    return report


# ---- the towers: trained to name what an image or a clip holds ----------------------------------------------------

# The tiny towers take the published models' input widths: 128 mel bins (transformers sizes the audio tower's input
# projection from its first convolution's width, so that width is 128, as in E2B), 640 raw samples per audio token
# in the unified model (llama.cpp's gemma4ua fixes it).
TOWER_CONFIG = {"gemma4": {"audio_config": {"subsampling_conv_channels": [128, 8]}},
                "gemma4_unified": {"audio_config": {"audio_embed_dim": 640}}}
# Training examples are smaller than the validation's (7 x 10 soft tokens, 2 s): 4 x 6 tokens and 1.2 s clips.
TRAIN_IMAGE_TOKENS = (4, 6)
TRAIN_CLIP_SECONDS = 1.2


def train_towers(name: str, steps: int, batch: int, seed: int = 0, lr: float = 3e-3, log=print) -> dict[str, Any]:
    """Re-initialise a tiny checkpoint's towers at the published input widths and train them to ground their soft
    tokens (gemma4_export/tiny/grounding.py): each image token onto the text embedding of the colour covering its
    region, each audio token onto that of what its 40 ms hold. The text model is not run; its tensors are written
    back unchanged. The unified model's audio is one linear map of raw 640-sample frames, which cannot tell a beep's
    pitch (or a beep from faint noise: its input is normalised) whatever its weights, so it stays as initialised."""
    import torch
    import transformers

    from gemma4_export.exporter.checkpoint import Checkpoint
    from gemma4_export.tiny import grounding as G
    from gemma4_export.validate.towers import _f32, audio_features, image_patches, image_size_for

    out = OUT_DIR / name
    config = json.loads((out / "config.json").read_text())
    for k, v in TOWER_CONFIG.get(config["model_type"], {}).items():
        if config.get(k):
            config[k] = {**config[k], **v}
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**config)
    model = getattr(transformers, config["architectures"][0])(cfg).float()
    model.model.language_model.requires_grad_(False)
    unified = config["model_type"] == "gemma4_unified"
    kinds = [k for k in ("image", "audio") if config.get(f"{'vision' if k == 'image' else 'audio'}_config")
             and not (unified and k == "audio")]
    if unified:
        model.model.embed_audio.requires_grad_(False)
    towers = [p for n, p in model.named_parameters() if p.requires_grad]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_processor(out)
    with Checkpoint(out) as ck:
        embed = _f32(ck, "model.language_model.embed_tokens.weight")
    classes = {k: torch.from_numpy(G.class_embeddings(embed, k)) for k in kinds}
    rng = np.random.default_rng(seed + 11)
    vision = config.get("vision_config") or {}
    patch = vision.get("patch_size", 16) * (vision.get("pooling_kernel_size", 3) if unified else 1)
    h, w = image_size_for(vision, TRAIN_IMAGE_TOKENS)

    def features_and_labels(kind):
        if kind == "image":
            img, _ = G.code_image(rng, h, w)
            pv, pos = image_patches(img, patch)
            o = model.model.get_image_features(torch.from_numpy(pv), torch.from_numpy(pos)).pooler_output
            feats = torch.cat(list(o)) if isinstance(o, (tuple, list)) else o
            return feats.reshape(-1, feats.shape[-1]), G.image_labels(img, h // TRAIN_IMAGE_TOKENS[0])
        wave, _ = G.code_clip(rng, TRAIN_CLIP_SECONDS)
        x, m = audio_features(wave, out)
        o = model.model.get_audio_features(torch.from_numpy(x), torch.from_numpy(m))
        feats = o.pooler_output[0][o.attention_mask[0].bool()]
        lab = G.clip_labels(wave)
        n = min(len(lab), len(feats))
        return feats[:n], lab[:n]

    def loss_of(feats, lab, c):
        """Cross-entropy of the nearest-class choice (squared distances over the classes' mean squared norm, x4)
        plus the squared distance to the true class's embedding, relative: the token is pulled onto it."""
        lab = torch.from_numpy(lab)
        scale = c.norm(dim=-1).mean() ** 2
        d = torch.cdist(feats, c) ** 2 / scale
        return torch.nn.functional.cross_entropy(-4 * d, lab) + d[torch.arange(len(lab)), lab].mean()

    report = json.loads((out / "training.json").read_text()) if (out / "training.json").exists() else {}
    t0 = time.time()
    if steps:
        opt = torch.optim.AdamW(towers, lr=lr, weight_decay=0.0)
        for step in range(steps):
            losses = {}
            for kind in kinds:
                loss = sum(loss_of(*features_and_labels(kind), classes[kind]) for _ in range(batch)) / batch
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[kind] = loss.item()
            if step % 50 == 0 or step == steps - 1:
                log(f"{name} towers step {step}: " + ", ".join(f"{k} loss {v:.3f}" for k, v in losses.items()))
    sd = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.state_dict().items()
          if not n.startswith(("model.language_model.", "lm_head"))}
    _replace_tensors(out, sd)
    acc = G.grounding_accuracy(out)  # from the written bf16 tensors, held-out inputs at the validation's sizes
    chance = {"image": 1 / len(G.COLOURS), "audio": 1 / len(G.SOUNDS)}
    report["towers"] = {
        "steps": steps, "batch": batch, "seed": seed, "seconds": round(time.time() - t0, 1),
        "task": "each image soft token onto the embedding of its region's colour token, each audio soft token onto "
                "that of quiet / low beep / high beep (gemma4_export/tiny/grounding.py); the text model not run"
                + ("; the unified model's audio embedder (linear on raw frames) left as initialised" if unified
                   else ""),
        "heldout_token_accuracy": {k: round(v, 4) for k, v in acc.items()},
        "chance": {k: round(chance[k], 4) for k in acc}}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"{name} towers: {report['towers']['heldout_token_accuracy']}")
    return report["towers"]


# Checkpoints built from another tiny checkpoint carry its towers.
TOWER_SOURCES = {"tiny-e2b-ft": "tiny-e2b", "tiny-e2b-qat": "tiny-e2b", "tiny-26b-a4b-qat": "tiny-26b-a4b"}


def copy_towers(src: str, dst: str, log=print) -> None:
    """Give `dst` the towers (tensors, tower configs, processor files) of `src`."""
    from safetensors.torch import load_file

    a, b = OUT_DIR / src, OUT_DIR / dst
    towers = {}
    for sh in sorted(a.glob("*.safetensors")):
        towers.update({n: t for n, t in load_file(str(sh)).items() if not n.startswith("model.language_model.")})
    _replace_tensors(b, towers)
    ca, cb = json.loads((a / "config.json").read_text()), json.loads((b / "config.json").read_text())
    for k in ("vision_config", "audio_config"):
        if cb.get(k) and ca.get(k):
            cb[k] = {**cb[k], **ca[k]}
    (b / "config.json").write_text(json.dumps(cb, indent=2) + "\n")
    write_processor(b)
    log(f"{dst}: the towers of {src}")


def _replace_tensors(out: Path, new: dict) -> None:
    """Rewrite a checkpoint's shards with its tower tensors replaced by `new` (and only those: every text tensor
    keeps its bytes, and a tower tensor the checkpoint had stays in its shard; new ones go to the last)."""
    import torch
    from safetensors.torch import load_file, save_file

    index = out / "model.safetensors.index.json"
    shards = sorted(out.glob("*.safetensors"))
    keep: dict[str, str] = {}
    placed = set()
    for sh in shards:
        sd = load_file(str(sh))
        for n in [n for n in sd if not n.startswith("model.language_model.")]:
            if n in new:
                sd[n] = new[n]
                placed.add(n)
            else:
                del sd[n]
        if sh == shards[-1]:
            sd.update({n: t for n, t in new.items() if n not in placed})
        save_file(sd, str(sh), metadata={"format": "pt"})
        keep.update({n: sh.name for n in sd})
    if index.exists():
        idx = json.loads(index.read_text())
        idx["weight_map"] = dict(sorted(keep.items()))
        idx["metadata"] = {**idx.get("metadata", {}), "total_size": sum(
            v.numel() * v.element_size() for sh in shards for v in load_file(str(sh)).values())}
        index.write_text(json.dumps(idx, indent=2) + "\n")
    del torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(tiny_configs()) + sorted(TOWER_SOURCES),
                    help="build just these")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", action="store_true", help="re-extract the corpus from this Python's stdlib first")
    ap.add_argument("--finetune", type=int, metavar="STEPS", help=f"only (re)build {FT_NAME}: tiny-e2b trained "
                    "STEPS more steps with added tokens, saved by transformers' save_pretrained")
    ap.add_argument("--qat", choices=sorted(QAT_BASES), action="append", help="only (re)build this tiny QAT "
                    "checkpoint: its base trained --steps more steps on a 4-bit lattice")
    ap.add_argument("--processors", action="store_true", help="only write the processor files (and the media "
                    "token strings) into the shipped checkpoints that have towers")
    ap.add_argument("--towers", type=int, metavar="STEPS", help="only re-initialise the towers of the --only "
                    "checkpoints (default: every tiny checkpoint with towers) at the published input widths, and "
                    "train them STEPS steps to ground their soft tokens in what code-made images and clips hold "
                    "(gemma4_export/tiny/grounding.py; 0: not trained)")
    a = ap.parse_args(argv)
    if a.towers is not None:
        names = a.only or [d.name for d in sorted(OUT_DIR.iterdir()) if (d / "config.json").exists()]
        for name in names:
            cfg = json.loads((OUT_DIR / name / "config.json").read_text())
            if (cfg.get("vision_config") or cfg.get("audio_config")) and name not in TOWER_SOURCES:
                train_towers(name, a.towers, a.batch, a.seed)
        for dst, src in TOWER_SOURCES.items():
            if src in names or dst in names:
                copy_towers(src, dst)
        return
    if a.processors:
        for d in sorted(OUT_DIR.iterdir()):
            write_processor(d)
        return
    if a.corpus or not (CORPUS_DIRS["train"] / "train.txt.gz").exists():
        make_corpus()
    if a.qat:
        for name in a.qat:
            qat(name, a.steps, a.seq, a.batch, a.seed)
        return
    if a.finetune:
        finetune(a.finetune, a.seq, a.batch, a.seed)
        return
    build(a.only or list(tiny_configs()), a.steps, a.seq, a.batch, a.seed)


if __name__ == "__main__":
    main()
