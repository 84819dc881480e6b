"""Agreement metrics between a reference and an artifact, as llama.cpp's `llama-perplexity --kl-divergence` defines
them: per scored token, KL(P_ref || Q_artifact) over the full vocabulary, whether both put their top-1 on the same
token, and the change in probability of the true next token; perplexities of both on the same tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class TokenStats:
    """Per-token arrays accumulated over windows."""

    kld: list
    same_top1: list
    dp: list
    nll_ref: list
    nll_art: list

    @classmethod
    def empty(cls) -> TokenStats:
        return cls([], [], [], [], [])

    def add(self, ref_logits: np.ndarray, art_logits: np.ndarray, targets: np.ndarray) -> None:
        """ref/art: [T, V] logits predicting targets [T] (the next token at each position)."""
        if ref_logits.shape != art_logits.shape:
            raise ValueError(f"logit shapes differ: reference {ref_logits.shape}, artifact {art_logits.shape}")
        lp, lq = log_softmax(ref_logits), log_softmax(art_logits)
        p = np.exp(lp)
        self.kld.extend(np.maximum((p * (lp - lq)).sum(-1), 0.0).tolist())
        self.same_top1.extend((ref_logits.argmax(-1) == art_logits.argmax(-1)).tolist())
        rows = np.arange(len(targets))
        self.dp.extend((np.exp(lq[rows, targets]) - p[rows, targets]).tolist())
        self.nll_ref.extend((-lp[rows, targets]).tolist())
        self.nll_art.extend((-lq[rows, targets]).tolist())


@dataclass
class LogitMetrics:
    tokens: int
    kld_mean: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1_agreement: float
    rms_dp: float
    ppl_ref: float
    ppl_artifact: float
    ppl_ratio: float
    max_logit_diff: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def summarize(s: TokenStats, max_logit_diff: float | None = None) -> LogitMetrics:
    k = np.asarray(s.kld)
    if k.size == 0:
        raise ValueError("no tokens were scored")
    ppl_ref = float(np.exp(np.mean(s.nll_ref)))
    ppl_art = float(np.exp(np.mean(s.nll_art)))
    return LogitMetrics(
        tokens=int(k.size),
        kld_mean=float(k.mean()),
        kld_p99=float(np.quantile(k, 0.99)),
        kld_p999=float(np.quantile(k, 0.999)),
        kld_max=float(k.max()),
        top1_agreement=float(np.mean(s.same_top1)),
        rms_dp=float(np.sqrt(np.mean(np.square(s.dp)))),
        ppl_ref=ppl_ref,
        ppl_artifact=ppl_art,
        ppl_ratio=ppl_art / ppl_ref,
        max_logit_diff=max_logit_diff,
    )


@dataclass
class GenerationMetrics:
    prompts: int
    new_tokens: int
    exact_match_rate: float
    mean_first_divergence: float  # position of the first differing token; new_tokens when identical
    samples: list

    def to_json(self) -> dict:
        return asdict(self)


def compare_generations(ref: list[list[int]], art: list[list[int]], new_tokens: int,
                        texts: list[tuple[str, str, str]]) -> GenerationMetrics:
    firsts, exact = [], 0
    for r, a in zip(ref, art):
        n = min(len(r), len(a))
        d = next((i for i in range(n) if r[i] != a[i]), n)  # a prefix of the other diverges where it ends
        exact += int(r == a)
        firsts.append(d if r != a else new_tokens)
    return GenerationMetrics(
        prompts=len(ref), new_tokens=new_tokens, exact_match_rate=exact / max(1, len(ref)),
        mean_first_divergence=float(np.mean(firsts)) if firsts else 0.0,
        samples=[{"prompt": p, "reference": rt, "artifact": at} for p, rt, at in texts],
    )
