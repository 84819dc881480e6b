"""onnxruntime as the runtime for ONNX artifacts: full-sequence logits in one run, and greedy generation through the
graph's own KV cache, one token per run, as an application drives it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import Gemma4ExportError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "mps": "CoreMLExecutionProvider",
             "coreml": "CoreMLExecutionProvider"}


def _directory(path: Path | str) -> Path:
    """The artifact directory of a path to it, or to one of its graphs (onnx/*.onnx)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    return path.parent if path.name == "onnx" and not (path / "inference_config.json").is_file() else path


def read_config(path: Path | str) -> dict:
    """One preset's section of an ONNX directory's inference_config.json. A directory can hold several presets' graphs
    (`--into`); then the path names which: one of its graphs (onnx/decoder_model_merged_q4.onnx, ...)."""
    from ..targets.onnx import CONFIG_FILE

    path = Path(path)
    d = _directory(path)
    try:
        doc = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Gemma4ExportError(f"{d}/{CONFIG_FILE}: unreadable ({e})") from None
    presets = doc.get("presets") if isinstance(doc, dict) else None
    if not isinstance(presets, dict) or not presets or not all(
            isinstance(c, dict) and isinstance(c.get("gemma4_export"), dict) and c["gemma4_export"].get("target") == "onnx"
            for c in presets.values()):
        raise Gemma4ExportError(f"{d}: not an ONNX model written by gemma4-export")
    if path.is_file():
        for c in presets.values():
            if any(Path(g["file"]).name == path.name for g in c.get("graphs", {}).values()):
                return c
        raise Gemma4ExportError(f"{path}: not one of the graphs {d}/{CONFIG_FILE} lists")
    if len(presets) > 1:
        from ..targets.onnx import DECODER

        names = ", ".join(f"{d}/{c['graphs'][DECODER]['file']}" for c in presets.values())
        raise Gemma4ExportError(f"{d} holds the graphs of several presets ({', '.join(presets)}): name one of them by "
                                f"its decoder graph, {names}")
    return next(iter(presets.values()))


def artifact_info(path: Path):
    from .harness import ArtifactInfo

    meta = read_config(path)["gemma4_export"]
    return ArtifactInfo(meta["preset"], {"general.name": meta.get("source"), **meta})


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    want = PROVIDERS.get(device)
    if want is None:
        raise Gemma4ExportError(f"--device {device}: onnxruntime takes cpu, cuda or mps (CoreML)")
    have = ort.get_available_providers()
    if want not in have:
        raise Gemma4ExportError(f"--device {device}: this onnxruntime has no {want} (available: {', '.join(have)}); "
                                "install onnxruntime-gpu for CUDA")
    return [want] if want == "CPUExecutionProvider" else [want, "CPUExecutionProvider"]


class ONNXRunner:
    """The two graphs as transformers.js drives them: embed_tokens on the new tokens, then the decoder on their
    embeddings, the attention mask, the positions and the KV cache."""

    name = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise Gemma4ExportError("validating ONNX needs onnxruntime: pip install 'gemma4-export[onnx]'") from None
        from ..targets.onnx import DECODER, EMBED

        self._ort = ort
        self._threads = threads
        self._path = path
        self.cfg = read_config(path)
        d = _directory(path)
        self.providers = providers_for(device)
        graphs = self.cfg.get("graphs") or {}
        if EMBED not in graphs or DECODER not in graphs:
            raise Gemma4ExportError(f"{d}/inference_config.json names no {EMBED} and {DECODER} graphs: an ONNX "
                                    "export from an older gemma4-export? Export it again")
        self.sessions = {part: self._open(d / graphs[part]["file"]) for part in (EMBED, DECODER)}
        self.session = self.sessions[DECODER]
        self.embed = self.sessions[EMBED]
        self._embed_outputs = [o.name for o in self.embed.get_outputs()]
        self.layers = self.cfg["kv_cache"]["layers"]
        self._tokenizer = None
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))

    def _open(self, f: Path, model: bytes | None = None):
        """A session on graph file `f`, or on `model` (that graph's bytes, changed) with `f`'s external data."""
        opts = self._ort.SessionOptions()
        if self._threads:
            opts.intra_op_num_threads = self._threads
        opts.log_severity_level = 3
        if model is not None:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(f.parent))
        try:
            return self._ort.InferenceSession(str(f) if model is None else model, opts, providers=self.providers)
        except Exception as e:  # onnxruntime's own error types
            raise Gemma4ExportError(f"onnxruntime could not load {f}: {e}") from None

    @property
    def tie(self) -> float:
        """The top-2 logit margin under which two greedy choices may differ by rounding alone."""
        return 3e-2 if self.cfg["kv_cache"]["dtype"] == "float16" else 1e-4

    def float_activations(self) -> int:
        """Run the decoder from here on with every MatMulNBits at float activations: the graph and weights as
        shipped, less `accuracy_level` 4. That level rounds a matrix's inputs to int8 per block, and onnxruntime's
        CPU kernels give a row results that differ in the last float bit with the number of rows in the run (one
        token through the cache, or the whole sequence without it); where such a difference moves an input across a
        rounding boundary, the output moves by a whole int8 step (up to 0.1 in the logits of tiny-e2b). The KV cache
        check compares the cached and the uncached runs for equality, so it runs without that rounding. Returns how
        many nodes changed (0: the decoder is left as it is)."""
        import onnx

        from ..targets.onnx import DECODER

        f = _directory(self._path) / self.cfg["graphs"][DECODER]["file"]
        model = onnx.load(str(f), load_external_data=False)
        changed = 0

        def strip(graph) -> None:
            nonlocal changed
            for node in graph.node:
                if node.op_type == "MatMulNBits":
                    keep = [a for a in node.attribute if not (a.name == "accuracy_level" and a.i != 0)]
                    changed += len(node.attribute) - len(keep)
                    del node.attribute[:]
                    node.attribute.extend(keep)
                for a in node.attribute:
                    for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                        strip(g)

        strip(model.graph)
        if changed:
            self.session = self.sessions[DECODER] = None  # the shipped graph's weights go first
            self.session = self.sessions[DECODER] = self._open(f, model.SerializeToString())
        return changed

    def tokenize(self, text: str) -> list[int]:
        """The artifact's own tokenizer.json, as an application would load it (tokenizers library)."""
        if self._tokenizer is None:
            raise Gemma4ExportError("the ONNX directory has no tokenizer.json")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def describe(self) -> dict:
        return {"runtime": f"onnxruntime {self._ort.__version__}", "device": self.session.get_providers()[0],
                "graphs": {p: g["file"] for p, g in self.cfg["graphs"].items()},
                "kv_cache": self.cfg["kv_cache"]["dtype"]}

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        feeds = {}
        for c in self.layers:
            z = np.zeros((batch, c["kv_heads"], 0, c["head_dim"]), np.dtype(self.cfg["kv_cache"]["dtype"]))
            feeds[c["past_key"]] = z
            feeds[c["past_value"]] = z
        return feeds

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: dict[str, np.ndarray],
            keep: int = 0, media: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One step: logits [B, S, V] (the last `keep` positions only, when keep > 0) and the cache to feed next.
        `media`: (mask [B, S] of the image / audio placeholder positions, their features [n, hidden]) written over
        those rows of the embeddings, as transformers.js merges an encoder's output (the per-layer inputs stay
        those of the placeholder ids)."""
        embedded = self.embed.run(self._embed_outputs, {"input_ids": ids.astype(np.int64)})
        if media is not None:
            at, feats = media
            embedded[0] = embedded[0].copy()
            embedded[0][at] = feats.astype(embedded[0].dtype)
        feeds = {**dict(zip(self._embed_outputs, embedded)), "attention_mask": mask.astype(np.int64),
                 "position_ids": positions.astype(np.int64), "num_logits_to_keep": np.array(keep, np.int64),
                 **cache}
        names = ["logits"] + [n for c in self.layers for n in (c["present_key"], c["present_value"])]
        outs = self.session.run(names, feeds)
        nxt = {}
        for c, k, v in zip(self.layers, outs[1::2], outs[2::2]):
            nxt[c["past_key"]], nxt[c["past_value"]] = k, v
        return outs[0], nxt

    def logits(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        out, _ = self.run(np.array([ids]), np.ones((1, n)), np.arange(n)[None], self.empty_cache())
        return out[0]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """n tokens by argmax: the prompt in one run, then one token per run through the KV cache."""
        out: list[int] = []
        logits, cache = self.run(np.array([ids]), np.ones((1, len(ids))), np.arange(len(ids))[None],
                                 self.empty_cache(), keep=1)
        total = len(ids)
        while True:
            nxt = int(np.argmax(logits[0, -1]))
            out.append(nxt)
            if len(out) == n:
                return out
            logits, cache = self.run(np.array([[nxt]]), np.ones((1, total + 1)), np.array([[total]]), cache,
                                     keep=1)
            total += 1

    def greedy_uncached(self, ids: list[int], n: int) -> tuple[list[int], list[float]]:
        """The same n tokens with no cache: the whole sequence again for each token. Also the margin between the
        two best logits at each step, to tell a near-tie from a real cache defect."""
        seq, out, margins = list(ids), [], []
        for _ in range(n):
            last = self.logits(seq)[-1]
            top2 = np.partition(last, -2)[-2:]
            margins.append(float(top2[1] - top2[0]))
            out.append(int(np.argmax(last)))
            seq.append(out[-1])
        return out, margins


def cache_consistency(runner: ONNXRunner, prompts: list[list[int]], n: int) -> dict:
    """Greedy tokens through the KV cache against the same without it. They must be equal; where they part, the
    uncached step's top-2 margin says whether it was a tie within float rounding (runner.tie: 1e-4 in float32; in
    a float16 graph 3e-2, twice float16's rounding of a logit near the softcap of 30) or a defect."""
    tie = runner.tie
    cases = []
    for p in prompts:
        cached = runner.greedy(p, n)
        plain, margins = runner.greedy_uncached(p, n)
        first = next((j for j, (a, b) in enumerate(zip(cached, plain)) if a != b), None)
        cases.append({"prompt_tokens": len(p), "equal": first is None, "first_difference": first,
                      "margin_there": None if first is None else margins[first]})
    defects = [c for c in cases if not c["equal"] and c["margin_there"] >= tie]
    equal = sum(c["equal"] for c in cases)
    ties = len(cases) - equal - len(defects)
    return {"prompts": len(cases), "new_tokens": n, "equal": equal, "cases": cases, "passed": not defects,
            "summary": f"greedy through the KV cache equals generation without it on {equal}/{len(cases)} prompts "
                       f"x {n} tokens" + (f"; {ties} parted at a near-tie (top-2 margin < {tie:g})" if ties else "")
                       + (f"; {len(defects)} parted where the choice was clear" if defects else "")}


def runtime_checks(runner: ONNXRunner, prompt_ids: list[list[int]], n: int) -> dict:
    float_nodes = runner.float_activations()
    out = cache_consistency(runner, prompt_ids, n)
    if float_nodes:
        out["float_activations_nodes"] = float_nodes
        out["summary"] += (f" (its {float_nodes} int8-activation MatMulNBits run at float activations for this "
                           "check: their int8 rounding differs between a one-token and a whole-sequence run)")
    return {"kv_cache": out}


def make_runner(path: Path, spec, device: str, preset: str) -> ONNXRunner:
    return ONNXRunner(path, device)
