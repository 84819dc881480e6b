"""What validation feeds both sides: held-out text windows, chat prompts, and a tokenizer parity set."""

from __future__ import annotations

import gzip
from pathlib import Path

HELDOUT = Path(__file__).resolve().parent.parent / "tiny" / "corpus" / "heldout.txt.gz"

# Chat prompts for greedy generation (rendered with the checkpoint's own chat template).
PROMPTS = (
    "Write the Python function isabstract.",
    "Write the Python function compress. Compress a block of data.",
    "Write the Python function topological_sort.",
    "Write the Python function repeat.",
    "Write the Python function url2pathname.",
    "Write the Python function S_ISDIR.",
    "Explain what a context manager is, then write one.",
    "Write the Python function main. Command-line interface.",
)

# Tokenizer parity: special tokens, code, whitespace runs, unicode, and byte fallback.
PARITY_TEXTS = (
    "Hello world! Café, naïve, façade — “quotes” and ‘apostrophes’.",
    "def f(x):\n    return x * 2\n\n\nclass A:\n\tpass\n",
    "    indented    with   runs      of spaces\n\n\n\nand newlines\n",
    "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n",
    "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>",
    "<|channel>thought\nlet me think<channel|>The answer is 42.",
    "日本語のテキスト、中文文本, 한국어, Ελληνικά, русский текст, עברית, العربية",
    "emoji 😀🎉👍🏽 and symbols ∑∫√∞ ≤ ≥ ≠ ½ ¾ © ®",
    "numbers 1234567890 3.14159 -2.5e-10 0xDEADBEEF",
    "mixed\r\nline endings\rand\ttabs\u00a0nbsp\u200bzero-width",
    "<unk><pad><mask> literal specials in text <eos>",
    "",
)


def heldout_text() -> str:
    with gzip.open(HELDOUT, "rb") as f:
        return f.read().decode("utf-8")
