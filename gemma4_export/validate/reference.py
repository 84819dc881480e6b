"""The whole-model reference: the checkpoint's own transformers class loaded whole in float32.

Validation does not use it (it needs the whole model in fp32 memory: 20 GB for E2B): validation's reference is the
streamed one (streamed.py, refdata.py). This one stays as the independent check of the streamed model (tests hold
the two to the same logits) and as the baseline the benchmark measures the streamed reference against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..exporter.arch import head_architecture, load_config
from ..exporter.tokenizer import tokenizer_file
from .streamed import pick_device


class WholeModelReference:
    """transformers' own Gemma 4 class, loaded from safetensors only, never with remote code."""

    def __init__(self, directory: str | Path, device: str = "cpu", adapter: str | Path | None = None):
        import torch
        import transformers

        self.dir = Path(directory)
        tokenizer_file(self.dir)  # a clear error for a checkpoint saved without its tokenizer
        cfg = load_config(self.dir)
        cls = getattr(transformers, head_architecture(cfg) or "Gemma4ForConditionalGeneration")
        self.device = pick_device(device)
        self.model = cls.from_pretrained(self.dir, dtype=torch.float32, use_safetensors=True)
        self.adapter = None
        if adapter is not None:
            # the merged model is the reference: the adapter merged in fp32 by torch (an implementation apart from
            # the exporters' streamed one; tests/test_adapter.py holds both to peft's own merge_and_unload)
            from ..exporter.adapter import Adapter, apply_to_torch_model
            from ..exporter.checkpoint import Checkpoint

            with Checkpoint(self.dir) as ck:
                a = Adapter.load(adapter, ck)
                try:
                    apply_to_torch_model(self.model, a)
                finally:
                    a.close()
            self.adapter = Path(adapter).resolve().name
        self.model = self.model.to(self.device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.dir)
        self.tokenizer.model_max_length = 1 << 30  # held-out text is tokenized whole, then cut into windows
        self._torch = torch
        # The reference's answers do not depend on the artifact: validating several artifacts of one model with the
        # same Reference computes them once.
        self._memo: dict[tuple, object] = {}

    def describe(self) -> dict:
        import transformers

        d = {"runtime": f"transformers {transformers.__version__}", "dtype": "float32", "device": self.device}
        if self.adapter:
            d["adapter"] = f"{self.adapter} (merged in fp32)"
        return d

    def logits(self, ids: list[int]) -> np.ndarray:
        key = ("logits", tuple(ids))
        if key not in self._memo:
            self._memo[key] = self._logits(ids)
        return self._memo[key]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        key = ("greedy", tuple(ids), n)
        if key not in self._memo:
            self._memo[key] = self._greedy(ids, n)
        return list(self._memo[key])

    def _logits(self, ids: list[int]) -> np.ndarray:
        t = self._torch
        with t.no_grad():
            x = t.tensor([ids], device=self.device)
            return self.model(input_ids=x).logits[0].float().cpu().numpy()

    def _greedy(self, ids: list[int], n: int) -> list[int]:
        """n new tokens by argmax, decoding one token at a time through the KV cache."""
        t = self._torch
        out: list[int] = []
        with t.no_grad():
            r = self.model(input_ids=t.tensor([ids], device=self.device), use_cache=True)
            for _ in range(n):
                nxt = int(r.logits[0, -1].argmax())
                out.append(nxt)
                if len(out) == n:
                    break
                r = self.model(input_ids=t.tensor([[nxt]], device=self.device), cache=r.past_key_values,
                               use_cache=True)
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def chat_prompt(self, user: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                  add_generation_prompt=True)
