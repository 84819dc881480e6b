"""Checkpoints in every layout transformers' own Gemma 4 classes write, made here with those classes and
`save_pretrained`, from the trained weights of a shipped tiny model (so that quantization error and thresholds
behave as on trained weights, not on random ones).

Each layout is a recipe: which class saves it (Gemma4ForCausalLM: text only, `model.*`; the multimodal class:
`model.language_model.*`, with towers, one of them, or none), tied or untied head, a vocabulary resized for added
tokens (its rows padded to a multiple of 64), the dtype on disk, one file or shards, softcapping on or off, and the
base classes' saves (Gemma4Model, Gemma4TextModel: what AutoModel gives, no head and no "model." prefix on the
names). save_pretrained never writes the k/v weights of KV-shared layers (transformers has no such modules), unlike
the hub's checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ADDED_TOKENS = ["<tool_call_v2>", "<tool_result_v2>", " gemma4_export_rocks"]


@dataclass(frozen=True)
class Layout:
    base: str = "tiny-e2b"
    text_only: bool = False  # Gemma4ForCausalLM
    towers: tuple[str, ...] | None = None  # None: as the base has them; () none; ("vision",) one
    tied: bool = True
    added_tokens: int = 0
    pad_to: int | None = None  # resize_token_embeddings' pad_to_multiple_of
    dtype: str = "bfloat16"
    shard: str | None = None  # max_shard_size
    softcap: bool = True
    base_class: bool = False  # saved by the base class (Gemma4Model, Gemma4TextModel: AutoModel's), no "model." prefix


LAYOUTS: dict[str, Layout] = {
    "causal-lm": Layout(text_only=True),
    "multimodal": Layout(),
    "vision-only": Layout(towers=("vision",)),
    "no-towers": Layout(towers=()),
    "untied-head": Layout(text_only=True, tied=False),
    "resized-vocab": Layout(added_tokens=len(ADDED_TOKENS), pad_to=64),
    "fp16": Layout(dtype="float16", text_only=True),
    "fp32-sharded": Layout(dtype="float32", shard="8MB"),
    "no-softcap": Layout(softcap=False, text_only=True),
    "unified-12b": Layout(base="tiny-12b"),
    "moe-26b": Layout(base="tiny-26b-a4b", text_only=True, tied=False),
    "k-eq-v-31b": Layout(base="tiny-31b", towers=()),
    "base-model": Layout(base_class=True),
    "text-base-model": Layout(text_only=True, base_class=True),
}


def build(name: str, out: Path) -> Path:
    """Write layout `name` into `out` (a new directory) and return it."""
    import torch
    import transformers

    from gemma4_export.exporter.variants import get_variant

    lay = LAYOUTS[name]
    src = get_variant(lay.base).local_dir
    cfg = json.loads((src / "config.json").read_text())
    full = getattr(transformers, cfg["architectures"][0]).from_pretrained(src, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    text_cfg = full.config.text_config
    text_cfg.tie_word_embeddings = lay.tied
    if not lay.softcap:
        text_cfg.final_logit_softcapping = None

    if lay.text_only:
        text_cfg.architectures = ["Gemma4ForCausalLM"]
        model = transformers.Gemma4ForCausalLM(text_cfg)
        state = {k.replace("model.language_model.", "model."): v for k, v in full.state_dict().items()
                 if k.startswith("model.language_model.")}
    else:
        c = full.config
        c.tie_word_embeddings = lay.tied
        if lay.towers is not None:
            for t in ("vision", "audio"):
                if t not in lay.towers and hasattr(c, f"{t}_config"):
                    setattr(c, f"{t}_config", None)
        model = type(full)(c)
        state = full.state_dict()
    if not lay.tied:
        # an untied head that differs from the embedding, as after fine-tuning with tie_word_embeddings false
        emb = state[next(k for k in state if k.endswith("embed_tokens.weight"))]
        g = torch.Generator().manual_seed(0)
        state["lm_head.weight"] = emb + 0.02 * emb.std() * torch.randn(emb.shape, generator=g)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(s in k for s in ("k_proj", "v_proj", "k_norm"))
               and not (lay.tied and k == "lm_head.weight")]
    if missing:
        raise RuntimeError(f"layout {name}: weights not carried over: {missing[:5]}")
    if lay.added_tokens:
        old = len(tok)
        tok.add_tokens(ADDED_TOKENS[: lay.added_tokens])
        # rows padded to a multiple of 64, as TRL and Unsloth resize: more rows than the tokenizer has tokens
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=lay.pad_to, mean_resizing=False)
        with torch.no_grad():  # new rows, as a fine-tune that taught the added tokens would leave them
            g = torch.Generator().manual_seed(1)
            for p in (model.get_input_embeddings().weight, *_ple_tables(model), *_untied_head(model)):
                new = p[old:]
                new.copy_(p[:old].std() * torch.randn(new.shape, generator=g) + p[:old].mean(0))
    model.generation_config = full.generation_config  # as from_pretrained + fine-tuning keeps it
    model = model.to(getattr(torch, lay.dtype))
    if lay.base_class:  # what AutoModel.from_pretrained(...).save_pretrained writes: the model without its head
        model = model.model
    model.save_pretrained(out, max_shard_size=lay.shard or "5GB")
    tok.save_pretrained(out)
    return Path(out)


def _ple_tables(model):
    return [p for n, p in model.named_parameters() if n.endswith("embed_tokens_per_layer.weight")]


def _untied_head(model):
    head = model.get_output_embeddings()
    if head is None or head.weight is model.get_input_embeddings().weight:
        return []
    return [head.weight]


def without_chat_template(base: str, out: Path) -> Path:
    """A copy of tiny checkpoint `base` whose tokenizer has no chat template, as a base model's or a raw-text
    fine-tune's is saved (no chat_template.jinja, none in tokenizer_config.json)."""
    import shutil

    from gemma4_export.exporter.variants import get_variant

    shutil.copytree(get_variant(base).local_dir, out)
    (out / "chat_template.jinja").unlink()
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    return out
