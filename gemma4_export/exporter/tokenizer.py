"""The tokenizer of a Gemma 4 checkpoint, read once from its files into what every target writes.

Gemma 4's tokenizer.json is a BPE with byte fallback (<0xNN> tokens) whose normalizer turns spaces into '▁'. Token
types follow llama.cpp's converter: byte tokens are BYTE, special added tokens CONTROL, the seven tool/channel
markers USER_DEFINED (so chat parsers can see them), everything else NORMAL.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
VISIBLE_TOKENS = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                            "<tool_response|>", '<|"|>'})
_BYTE_RE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass(frozen=True)
class TokenizerInfo:
    tokens: list[str]
    types: list[int]
    merges: list[str]  # "left right"
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    mask_id: int | None
    chat_template: str | None
    add_bos: bool
    eos_ids: tuple[int, ...]  # every end-of-generation id (generation_config), eos first

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def tokenizer_file(directory: str | Path) -> Path:
    """The checkpoint's tokenizer.json, which every artifact and the calibration and reference need."""
    d = Path(directory)
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise CheckpointError(
            f"{d}: no tokenizer.json. Gemma 4 checkpoints ship one; a fine-tune saved with model.save_pretrained "
            "alone has none: save the tokenizer beside it (tokenizer.save_pretrained on the same directory, or "
            "processor.save_pretrained for the multimodal model) or copy the base model's tokenizer files into it")
    return tj


def read_tokenizer(directory: str | Path, vocab_rows: int) -> TokenizerInfo:
    d = Path(directory)
    tj = tokenizer_file(d)
    data = _json(tj)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise CheckpointError(f"{tj}: expected a BPE tokenizer with byte fallback, as Gemma 4's is")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    by_id: dict[int, str] = {}
    for text, i in vocab.items():
        if i in by_id and by_id[i] != text:
            raise CheckpointError(f"{tj}: id {i} is both {by_id[i]!r} and {text!r}")
        by_id[i] = text
    n = max(by_id) + 1 if by_id else 0
    if n > vocab_rows:
        raise CheckpointError(f"{tj}: {n} tokens, but the embedding has only {vocab_rows} rows")
    # Rows beyond the tokenizer are padding the runtimes still need a name for.
    tokens = [by_id.get(i, f"<unused_pad_{i}>") for i in range(vocab_rows)]
    if len(set(tokens)) != len(tokens):
        raise CheckpointError(f"{tj}: duplicate token strings (llama.cpp refuses such a vocabulary)")
    special = {c for c, t in added.items() if t.get("special")}
    types = []
    for t in tokens:
        if _BYTE_RE.match(t):
            types.append(BYTE)
        elif t in VISIBLE_TOKENS:
            types.append(USER_DEFINED)
        elif t in special:
            types.append(CONTROL)
        elif t in added:
            types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    cfg = _json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}

    def tid(key: str, default: str | None) -> int | None:
        v = cfg.get(key, default)
        if isinstance(v, dict):
            v = v.get("content")
        if v is None:
            return None
        if v not in vocab:
            raise CheckpointError(f"{d}: tokenizer_config {key}={v!r} is not in the vocabulary")
        return vocab[v]

    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    eos = tid("eos_token", "<eos>")
    eos_ids = [eos]
    gen = d / "generation_config.json"
    if gen.is_file():
        g = _json(gen).get("eos_token_id")
        for e in g if isinstance(g, list) else [g] if g is not None else []:
            if e not in eos_ids:
                eos_ids.append(int(e))
    return TokenizerInfo(
        tokens=tokens, types=types, merges=merges,
        bos_id=tid("bos_token", "<bos>"), eos_id=eos, pad_id=tid("pad_token", "<pad>"),
        unk_id=tid("unk_token", "<unk>"), mask_id=tid("mask_token", None) if "mask_token" in cfg else None,
        chat_template=template,
        # Gemma 4 needs <bos>; tokenizer_config says false only because its chat template adds it.
        add_bos=True,
        eos_ids=tuple(eos_ids),
    )
