"""Reference results: everything validation needs from the fp32 model, computed once and storable.

`ReferenceData.compute` runs the streamed fp32 model (validate/streamed.py) over the evaluation windows and the chat
prompts, and keeps:
- the token ids it was fed (held-out windows, prompts, tokenizer-parity texts with the reference tokenizer's ids);
- per scored position, its log-probabilities in a compact form: the most likely tokens until they hold all but
  COVERAGE of the probability (at most TOP_CAP of them), the log-sum-exp, and the true next token's log-probability;
- its greedy continuation of every prompt, with the margin between its first and second choice at every step;
- what it was computed from: the checkpoint's digest, transformers and torch versions, dtype and device.

`save` writes it as a directory (reference.json, logprobs.npz, the tokenizer files), `load` reads it back, and
validation of any artifact of the same weights uses it without loading the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import Gemma4ExportError
from ..progress import Reporter, Silent
from .texts import PARITY_TEXTS, PROMPTS, heldout_text

FORMAT = "gemma4-export reference 1"
JSON_FILE = "reference.json"
ARRAYS_FILE = "logprobs.npz"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "generation_config.json")
# The stored distribution of a position holds its most likely tokens until all but COVERAGE of the probability is
# in them. The rest is one bucket: KLD from the compact form is then a lower bound of the full-vocabulary KLD, short
# of it by about the bucket's mass times the KLD within it (tests/test_refdata.py measures it).
COVERAGE = 1e-3
TOP_CAP = 4096


class ReferenceMismatch(Gemma4ExportError):
    """A stored reference of other weights (or another evaluation) than asked for."""


@dataclass
class Generation:
    prompt: str  # the user turn, before the chat template
    ids: list[int]  # the prompt's token ids, template applied (BOS and the plain text where the tokenizer has none)
    tokens: list[int]  # the reference's greedy continuation (ends at EOS, or after new_tokens)
    margins: list[float]  # its first minus second logit at each step
    second: list[int]  # its second choice at each step


@dataclass
class Window:
    ids: list[int]  # bos + held-out tokens
    half: int  # positions half .. len-2 are scored (their next token is known), as llama-perplexity does


@dataclass
class ReferenceData:
    meta: dict
    spec: dict  # EvalSpec as a dict
    parity: list[tuple[str, list[int]]]
    windows: list[Window]
    generations: list[Generation]
    arrays: dict[str, np.ndarray]  # offsets, ids, logprobs, target_logprob, lse: rows of every window, in order
    directory: Path | None = None  # where it was loaded from (its tokenizer decodes)
    _tokenizer: object = field(default=None, repr=False)

    # ---- per-window views ----------------------------------------------------------------------------------------
    def rows_of(self, w: int) -> tuple[int, int]:
        """Row range [a, b) of window w in the arrays."""
        counts = [len(x.ids) - 1 - x.half for x in self.windows]
        a = sum(counts[:w])
        return a, a + counts[w]

    def compact(self, w: int) -> CompactRows:
        a, b = self.rows_of(w)
        off = self.arrays["offsets"]
        lo, hi = int(off[a]), int(off[b])
        return CompactRows(off[a: b + 1] - lo, self.arrays["ids"][lo:hi], self.arrays["logprobs"][lo:hi],
                           self.arrays["target_logprob"][a:b], self.arrays["lse"][a:b])

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.meta.get("eos_ids", ()))

    def decode(self, ids: list[int]) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if self.directory is None:
                raise Gemma4ExportError("this reference has no tokenizer to decode with")
            self._tokenizer = AutoTokenizer.from_pretrained(self.directory / TOKENIZER_DIR)
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict:
        m = self.meta
        d = {"runtime": f"transformers {m['transformers']} (streamed)", "dtype": m["dtype"], "device": m["device"]}
        if m.get("adapter"):
            d["adapter"] = f"{m['adapter']} (merged in fp32)"
        if self.directory is not None:
            d["stored"] = self.directory.name
        return d

    def check_source(self, name: str, digest: str | None, what: str) -> None:
        """Refuse a reference of other weights than `digest` (what: how the caller names those weights)."""
        mine = self.meta.get("source_digest")
        if digest and mine and digest != mine:
            raise ReferenceMismatch(
                f"the reference was computed from {self.meta.get('source')} ({mine[:19]}...), but {what} comes from "
                f"other weights ({digest[:19]}...): compute a reference of this checkpoint with "
                "`gemma4-export reference`")
        if not digest and name and self.meta.get("source") and name != self.meta["source"]:
            raise ReferenceMismatch(f"the reference was computed from {self.meta['source']}, but {what} comes from "
                                    f"{name}")

    # ---- computing -----------------------------------------------------------------------------------------------
    @classmethod
    def compute(cls, src, spec, device: str = "cpu", reporter: Reporter | None = None,
                keep_bytes: int | None = None) -> ReferenceData:
        """The streamed fp32 reference of `src` (an exporter.source.ModelSource with weights) for `spec`."""
        import torch
        import transformers

        from ..exporter.tokenizer import read_tokenizer, tokenizer_file
        from ..quant.plan import text_parameters
        from .streamed import DEFAULT_KEEP_BYTES, StreamedModel

        reporter = reporter or Silent()
        t_all = time.perf_counter()
        tokenizer_file(src.directory)  # a clear error for a checkpoint saved without its tokenizer
        tok = transformers.AutoTokenizer.from_pretrained(src.directory)
        tok.model_max_length = 1 << 30  # held-out text is tokenized whole, then cut into windows
        encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
        bos = src.arch.bos_token_id
        if tok.chat_template:  # the prompts as an application renders them: the checkpoint's own chat template
            chat = lambda user: tok.apply_chat_template(  # noqa: E731
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
            prompt_ids = lambda user: encode(chat(user))  # noqa: E731
        else:  # a tokenizer saved without a template (a base model's, a raw-text fine-tune's): plain text after BOS
            chat = lambda user: user  # noqa: E731
            prompt_ids = lambda user: [bos] + encode(user)  # noqa: E731
        eos = read_tokenizer(src.directory, src.arch.vocab_size).eos_ids

        texts = list(PARITY_TEXTS) + [chat(p) for p in PROMPTS[:2]] + [heldout_text()[:4000]]
        parity = [(t, encode(t)) for t in texts]
        ids = encode(heldout_text())
        body = spec.window - 1
        if len(ids) < spec.windows * body:
            raise Gemma4ExportError(f"held-out text gives {len(ids)} tokens, {spec.windows}x{body} needed")
        stride = len(ids) // spec.windows
        windows = [Window([bos] + ids[w * stride: w * stride + body], (body + 1) // 2) for w in range(spec.windows)]
        prompts = [(p, prompt_ids(p)) for p in PROMPTS[: spec.prompts]]

        model = StreamedModel(src.directory, device, src.adapter,
                              DEFAULT_KEEP_BYTES if keep_bytes is None else keep_bytes)
        try:
            caches = [model.new_cache() for _ in prompts]
            t0 = time.perf_counter()
            with reporter.task("reference: windows and prompts", model.config.num_hidden_layers,
                               unit="layers") as task:
                seqs = model.start([w.ids for w in windows] + [p[1] for p in prompts],
                                   [None] * len(windows) + caches)
                model.run_layers(seqs, lambda i: task.advance(1))
            parts = []
            with reporter.task("reference: output head", len(windows), unit="windows") as task:
                for w, s in zip(windows, seqs):
                    parts.append(_compact(model, s.hidden[0][w.half:-1], np.asarray(w.ids[w.half + 1:])))
                    task.advance(1)
            seconds = {"windows": time.perf_counter() - t0}
            t0 = time.perf_counter()
            gens = [Generation(p, pid, [], [], []) for p, pid in prompts]
            last = [s.hidden[0][-1:] for s in seqs[len(windows):]]
            del seqs
            with reporter.task("reference: greedy generation", spec.new_tokens, unit="tokens") as task:
                active = list(range(len(gens)))
                for step in range(spec.new_tokens):
                    h = torch.cat([last[i] for i in active]) if active else None
                    if h is None:
                        break
                    r = model.reduce(h, None, 2)
                    nxt = []
                    for row, i in enumerate(active):
                        g = gens[i]
                        top, v = r["top_ids"][row], r["top_logits"][row]
                        g.tokens.append(int(top[0]))
                        g.margins.append(float(v[0] - v[1]))
                        g.second.append(int(top[1]))
                        if int(top[0]) not in eos and len(g.tokens) < spec.new_tokens:
                            nxt.append(i)
                    active = nxt
                    task.advance(1)
                    if active:
                        hs = model.final_hidden([[gens[i].tokens[-1]] for i in active], [caches[i] for i in active])
                        for i, hh in zip(active, hs):
                            last[i] = hh[-1:]
            seconds["generation"] = time.perf_counter() - t0
            layers_read = model.layers_read
        finally:
            model.close()

        arrays = _concat(parts)
        tail = np.array([p["tail_mass"] for p in parts])
        meta = {
            "format": FORMAT,
            "source": src.name,
            "hub_id": src.hub_id,
            "source_digest": src.digest,
            "adapter": src.adapter.resolve().name if src.adapter is not None else None,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32",
            "device": model.device,
            "eos_ids": list(eos),
            "prompt_format": "chat template" if tok.chat_template else "plain text after BOS (no chat template)",
            "vocab_size": int(src.arch.vocab_size),
            "text_parameters": text_parameters(src.arch),
            "coverage": COVERAGE,
            "top_cap": TOP_CAP,
            "entries_per_position": float(len(arrays["ids"]) / max(1, len(arrays["lse"]))),
            "tail_mass_mean": float(tail.mean()) if tail.size else 0.0,
            "layers_read": layers_read,
            "seconds": {**seconds, "total": time.perf_counter() - t_all},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        data = cls(meta, asdict(spec), parity, windows, gens, arrays)
        data._tokenizer = tok
        return data

    # ---- storing -------------------------------------------------------------------------------------------------
    def save(self, out: str | Path, tokenizer_from: Path | None = None, force: bool = False) -> Path:
        """Write the reference directory atomically (a staging directory renamed into place)."""
        out = Path(out)
        if out.exists() and not force:
            raise Gemma4ExportError(f"{out} exists (pass --force to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.with_name(f".{out.name}.partial-{os.getpid()}")
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            doc = {"meta": self.meta, "spec": self.spec,
                   "parity": [{"text": t, "ids": i} for t, i in self.parity],
                   "windows": [asdict(w) for w in self.windows],
                   "generations": [asdict(g) for g in self.generations]}
            (stage / JSON_FILE).write_text(json.dumps(doc) + "\n")
            with open(stage / ARRAYS_FILE, "wb") as f:
                np.savez(f, **self.arrays)
            if tokenizer_from is not None:
                (stage / TOKENIZER_DIR).mkdir()
                for n in TOKENIZER_FILES:
                    if (tokenizer_from / n).is_file():
                        shutil.copyfile(tokenizer_from / n, stage / TOKENIZER_DIR / n)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(stage, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        self.directory = out
        return out

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceData:
        d = Path(directory)
        if not (d / JSON_FILE).is_file():
            raise Gemma4ExportError(f"{d}: not a reference directory (no {JSON_FILE}); make one with "
                                    "`gemma4-export reference`")
        try:
            doc = json.loads((d / JSON_FILE).read_text())
            if doc.get("meta", {}).get("format") != FORMAT:
                raise Gemma4ExportError(f"{d}: a reference of another format ({doc.get('meta', {}).get('format')}, "
                                        f"this version reads {FORMAT}); compute it again")
            with np.load(d / ARRAYS_FILE) as z:
                arrays = {k: z[k] for k in ("offsets", "ids", "logprobs", "target_logprob", "lse")}
            data = cls(doc["meta"], doc["spec"], [(p["text"], p["ids"]) for p in doc["parity"]],
                       [Window(**w) for w in doc["windows"]], [Generation(**g) for g in doc["generations"]],
                       arrays, d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Gemma4ExportError(f"{d}: a damaged reference ({type(e).__name__}: {e}); compute it again") from None
        rows = sum(len(w.ids) - 1 - w.half for w in data.windows)
        if len(arrays["lse"]) != rows or len(arrays["offsets"]) != rows + 1 or \
                int(arrays["offsets"][-1]) != len(arrays["ids"]):
            raise Gemma4ExportError(f"{d}: a damaged reference (its arrays do not match its windows)")
        return data


@dataclass
class CompactRows:
    """The stored distributions of one window's scored positions."""

    offsets: np.ndarray  # [P+1]: entries of row i are offsets[i]:offsets[i+1]
    ids: np.ndarray  # token ids, most likely first
    logprobs: np.ndarray  # their log-probabilities
    target_logprob: np.ndarray  # [P] the true next token's log-probability
    lse: np.ndarray  # [P] log-sum-exp of the logits (logit = logprob + lse)

    def __len__(self) -> int:
        return len(self.lse)

    @property
    def top1(self) -> np.ndarray:
        return self.ids[self.offsets[:-1]]


def _compact(model, h, targets: np.ndarray) -> dict:
    """One window's scored rows, reduced by the streamed head to the compact form."""
    r = model.reduce(h, targets, TOP_CAP)
    lse = r["lse"]
    lp = r["top_logits"].astype(np.float64) - lse[:, None]
    cum = np.cumsum(np.exp(lp), axis=1)
    k = np.minimum((cum < 1.0 - COVERAGE).sum(axis=1) + 1, lp.shape[1])
    counts = k.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ids = np.concatenate([r["top_ids"][i, :c] for i, c in enumerate(counts)]).astype(np.int32)
    logp = np.concatenate([lp[i, :c] for i, c in enumerate(counts)]).astype(np.float32)
    tail = 1.0 - cum[np.arange(len(k)), k - 1]
    return {"offsets": offsets, "ids": ids, "logprobs": logp,
            "target_logprob": (r["target_logit"] - lse).astype(np.float32), "lse": lse.astype(np.float64),
            "tail_mass": float(np.clip(tail, 0, 1).mean())}


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    offsets, base = [np.zeros(1, dtype=np.int64)], 0
    for p in parts:
        offsets.append(p["offsets"][1:] + base)
        base += int(p["offsets"][-1])
    return {"offsets": np.concatenate(offsets),
            "ids": np.concatenate([p["ids"] for p in parts]).astype(np.int32),
            "logprobs": np.concatenate([p["logprobs"] for p in parts]).astype(np.float32),
            "target_logprob": np.concatenate([p["target_logprob"] for p in parts]).astype(np.float32),
            "lse": np.concatenate([p["lse"] for p in parts]).astype(np.float64)}
