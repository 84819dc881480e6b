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

    def add_compact(self, ref, art_logits: np.ndarray, targets: np.ndarray, chunk: int = 64) -> float:
        """ref: a refdata.CompactRows (the reference's stored distributions of P positions); art: [P, V] logits.
        KLD over the stored tokens plus one bucket for the rest of the vocabulary (a lower bound of the full KLD,
        short by about the bucket's mass times the KLD inside it); top-1, true-token probability and perplexity are
        exact. Returns the largest |logit difference| over the stored tokens. Rows go `chunk` at a time, so memory
        follows the chunk, not P x V in float64."""
        if len(ref) != len(art_logits) or len(targets) != len(ref):
            raise ValueError(f"{len(ref)} reference rows, {len(art_logits)} artifact rows, {len(targets)} targets")
        off, max_diff = ref.offsets, 0.0
        self.same_top1.extend((art_logits.argmax(-1) == ref.top1).tolist())
        for a in range(0, len(ref), chunk):
            b = min(len(ref), a + chunk)
            lq = log_softmax(art_logits[a:b])
            for i in range(a, b):
                s = slice(int(off[i]), int(off[i + 1]))
                ids, lp = ref.ids[s], ref.logprobs[s].astype(np.float64)
                lq_s = lq[i - a, ids]
                p = np.exp(lp)
                kld = float((p * (lp - lq_s)).sum())
                p_rest = 1.0 - p.sum()
                if p_rest > 0:
                    q_rest = max(1.0 - float(np.exp(lq_s).sum()), 1e-300)
                    kld += p_rest * np.log(p_rest / q_rest)
                self.kld.append(max(kld, 0.0))
                t = int(targets[i])
                lp_t = float(ref.target_logprob[i])
                self.dp.append(float(np.exp(lq[i - a, t]) - np.exp(lp_t)))
                self.nll_ref.append(-lp_t)
                self.nll_art.append(float(-lq[i - a, t]))
                diff = np.abs(lp + ref.lse[i] - art_logits[i, ids]).max()
                max_diff = max(max_diff, float(diff))
        return max_diff


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


# A greedy divergence where the reference's own first and second choices were within this many nats of each other,
# and the artifact took the second, is a tie broken the other way: reported, not counted as a defect.
NEAR_TIE = 0.01


@dataclass
class GenerationMetrics:
    prompts: int
    new_tokens: int
    exact_match_rate: float
    mean_first_divergence: float  # position of the first differing token; new_tokens when identical
    samples: list
    near_ties: int = 0  # divergences on a near-tie of the reference (NEAR_TIE)
    agreement_rate: float = 0.0  # exact matches plus near-tie divergences, over prompts
    mean_first_divergence_ties_ok: float = 0.0  # as mean_first_divergence, a near-tie divergence counted as none

    def to_json(self) -> dict:
        return asdict(self)


def compare_generations(ref: list[list[int]], art: list[list[int]], new_tokens: int,
                        texts: list[tuple[str, str, str]],
                        choices: list[tuple[list[float], list[int]]] | None = None) -> GenerationMetrics:
    """choices: per prompt, the reference's margin between its first and second choice and its second choice at
    each step; with them, a divergence on a near-tie is told apart."""
    firsts, firsts_ok, exact, ties = [], [], 0, 0
    samples = []
    for k, (r, a) in enumerate(zip(ref, art)):
        n = min(len(r), len(a))
        d = next((i for i in range(n) if r[i] != a[i]), n)  # a prefix of the other diverges where it ends
        exact += int(r == a)
        tie = False
        if r != a and choices is not None and d < n:
            margins, second = choices[k]
            tie = margins[d] < NEAR_TIE and a[d] == second[d]
        ties += int(tie)
        firsts.append(d if r != a else new_tokens)
        firsts_ok.append(new_tokens if (r == a or tie) else d)
        if k < len(texts):
            p, rt, at = texts[k]
            samples.append({"prompt": p, "reference": rt, "artifact": at}
                           | ({"near_tie_at": d, "reference_margin": margins[d]} if tie else {}))
    n_p = max(1, len(ref))
    return GenerationMetrics(
        prompts=len(ref), new_tokens=new_tokens, exact_match_rate=exact / n_p,
        mean_first_divergence=float(np.mean(firsts)) if firsts else 0.0,
        samples=samples, near_ties=ties, agreement_rate=(exact + ties) / n_p,
        mean_first_divergence_ties_ok=float(np.mean(firsts_ok)) if firsts_ok else 0.0,
    )
