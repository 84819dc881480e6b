"""llama.cpp as the runtime for GGUF artifacts, through llama-cpp-python."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import llama_log
from ..errors import Gemma4ExportError


BATCH = 512


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int, device: str = "cpu", kv_type: str = "f16",
                 threads: int | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise Gemma4ExportError("validating GGUF needs llama-cpp-python: pip install 'gemma4-export[gguf]'") \
                from None
        llama_log.capture()
        self._llama_cpp = llama_cpp
        kv = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_type]
        gpu = device in ("cuda", "mps", "metal", "gpu")
        if gpu and not llama_cpp.llama_supports_gpu_offload():
            raise Gemma4ExportError(f"--device {device}: this llama-cpp-python build has no GPU offload "
                                    "(rebuild it with CMAKE_ARGS=-DGGML_CUDA=on or -DGGML_METAL=on)")
        self.device = "gpu" if gpu else "cpu"
        self.kv_type = kv_type
        try:
            self.llm = llama_cpp.Llama(
                # batches of at most 512 tokens: llama.cpp's output and compute buffers follow the batch (512 x
                # 262,144 vocabulary logits are 0.5 GB each), and the KV cache carries the window between batches
                model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, BATCH), n_ubatch=min(n_ctx, BATCH),
                logits_all=True,
                n_gpu_layers=-1 if gpu else 0, type_k=kv, type_v=kv, verbose=False, n_threads=threads,
                swa_full=True,
            )
        except Exception as e:
            raise Gemma4ExportError(f"llama.cpp could not load {path}: {e}\n{llama_log.recent()}") from None

    def describe(self) -> dict:
        return {"runtime": f"llama.cpp (llama-cpp-python {self._llama_cpp.__version__})", "device": self.device,
                "kv_cache": self.kv_type}

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), V] logits: a read-only view of llama-cpp-python's own scores, valid until the next call (a
        copy would be another window x vocabulary array in memory)."""
        self.llm.reset()
        self.llm.eval(ids)
        v = self.llm.scores[: len(ids)].view()
        v.flags.writeable = False
        return v

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if len(out) == n:
                break
            self.llm.eval([nxt])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


def artifact_info(path: Path):
    from ..targets.gguf_file import read_gguf
    from .harness import ArtifactInfo

    g = read_gguf(path, arrays=False)
    if g.architecture != "gemma4":
        raise Gemma4ExportError(f"{path}: a GGUF of architecture {g.architecture!r}, not a Gemma 4 model")
    preset = g.metadata.get("gemma4_export.preset")
    if preset is None:
        raise Gemma4ExportError(f"{path}: not written by gemma4-export (no gemma4_export.preset key); "
                                "its thresholds are unknown")
    meta = dict(g.metadata)
    for k in ("base", "adapter", "source_digest"):
        if f"gemma4_export.{k}" in meta:
            meta[k] = meta[f"gemma4_export.{k}"]
    repo = str(meta.get("general.source.repo_url", ""))
    if repo.startswith("https://huggingface.co/"):
        meta["hub_id"] = repo[len("https://huggingface.co/"):]
    return ArtifactInfo(preset, meta)


def make_runner(path: Path, spec, device: str, preset: str) -> LlamaCppRunner:
    return LlamaCppRunner(path, n_ctx=max(spec.window, 512) + spec.new_tokens + 64, device=device,
                          kv_type="f32" if preset == "f32" else "f16")
