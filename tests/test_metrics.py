"""The agreement metrics (gemma4_export/validate/metrics.py) against values worked out by hand.

Every expected value here is computed with the `math` module over plain lists, one formula at a time, never by the
numpy code under test: softmax, KL(P_ref || Q_art) = sum_i p_i (log p_i - log q_i), top-1 agreement, the change in
probability of the true token (artifact minus reference), perplexity exp(mean NLL), and numpy's default (linear)
quantile, written out as the interpolation between the two neighbouring sorted values.
"""

import math

import numpy as np
import pytest

from gemma4_export.validate.metrics import (
    GenerationMetrics,
    LogitMetrics,
    TokenStats,
    compare_generations,
    log_softmax,
    summarize,
)


# ---- hand computations ------------------------------------------------------------------------------------------


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [v / s for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=lambda i: row[i])


def linear_quantile(values: list[float], q: float) -> float:
    """numpy's default quantile: position h = (n - 1) q in the sorted values, linear between its neighbours."""
    x = sorted(values)
    h = (len(x) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (h - lo) * (x[hi] - x[lo])


# Three scored tokens over a four-word vocabulary, added as two windows (2 tokens, then 1).
REF = [[2.0, 1.0, 0.0, -1.0],
       [0.0, 1.0, 0.5, -0.5],
       [3.0, 0.0, 0.0, 1.0]]
ART = [[1.5, 1.0, 0.5, -1.0],   # top-1 stays on 0
       [0.0, 0.5, 1.0, -0.5],   # top-1 moves from 1 to 2 (no ties in either row)
       [3.0, 0.0, 0.0, 1.0]]    # identical row: KLD 0
TARGETS = [0, 2, 3]


def _stats() -> TokenStats:
    s = TokenStats.empty()
    s.add(np.array(REF[:2]), np.array(ART[:2]), np.array(TARGETS[:2]))
    s.add(np.array(REF[2:]), np.array(ART[2:]), np.array(TARGETS[2:]))
    return s


def _hand():
    P = [softmax(r) for r in REF]
    Q = [softmax(r) for r in ART]
    kld = [kl(p, q) for p, q in zip(P, Q)]
    same = [argmax(r) == argmax(a) for r, a in zip(REF, ART)]
    dp = [q[t] - p[t] for p, q, t in zip(P, Q, TARGETS)]
    nll_ref = [-math.log(p[t]) for p, t in zip(P, TARGETS)]
    nll_art = [-math.log(q[t]) for q, t in zip(Q, TARGETS)]
    return kld, same, dp, nll_ref, nll_art


# ---- log_softmax --------------------------------------------------------------------------------------------------


def test_log_softmax_matches_hand():
    row = [2.0, 1.0, 0.0, -1.0]
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    got = log_softmax(np.array([row]))
    assert got.dtype == np.float64
    assert got[0].tolist() == pytest.approx([x - lse for x in row], rel=0, abs=1e-14)


def test_log_softmax_stable_with_large_logits():
    # exp(1000) overflows float64; the max is subtracted first. log softmax([1000, 1001]) = [-log(1 + e), -log(1 + 1/e)].
    got = log_softmax(np.array([[1000.0, 1001.0]]))
    assert np.all(np.isfinite(got))
    assert got[0, 0] == pytest.approx(-math.log(1 + math.e), rel=1e-14)
    assert got[0, 1] == pytest.approx(-math.log(1 + math.exp(-1)), rel=1e-14)
    # Same in float32 input (upcast to float64 before exponentiating), and far apart logits give -inf-free output.
    got32 = log_softmax(np.array([[1000.0, 1001.0], [-1000.0, 1000.0]], dtype=np.float32))
    assert got32.dtype == np.float64 and np.all(np.isfinite(got32))
    assert got32[0].tolist() == pytest.approx([-math.log(1 + math.e), -math.log(1 + math.exp(-1))], rel=1e-14)
    assert got32[1, 0] == pytest.approx(-2000.0, rel=1e-14) and got32[1, 1] == 0.0


def test_large_logits_give_finite_metrics():
    ref = [[1000.0, 1001.0, 999.0]]
    art = [[1001.0, 1000.0, 999.0]]
    s = TokenStats.empty()
    s.add(np.array(ref), np.array(art), np.array([1]))
    p, q = softmax([0.0, 1.0, -1.0]), softmax([1.0, 0.0, -1.0])  # shift-invariant: the same rows minus 1000
    m = summarize(s)
    assert m.kld_mean == pytest.approx(kl(p, q), rel=1e-12)
    assert m.top1_agreement == 0.0
    assert m.ppl_ref == pytest.approx(1 / p[1], rel=1e-12)
    assert m.ppl_artifact == pytest.approx(1 / q[1], rel=1e-12)


# ---- per-token values and their summary --------------------------------------------------------------------------


def test_per_token_values_match_hand():
    s = _stats()
    kld, same, dp, nll_ref, nll_art = _hand()
    assert len(s.kld) == 3
    assert s.kld == pytest.approx(kld, rel=1e-12, abs=1e-15)
    assert s.kld[2] == 0.0  # identical third row
    assert s.kld[0] > 0 and s.kld[1] > 0
    assert s.same_top1 == [True, False, True] == same
    assert s.dp == pytest.approx(dp, rel=1e-12, abs=1e-15)
    assert s.dp[0] < 0 and s.dp[1] > 0  # artifact minus reference: the flattened row 0 loses mass on token 0
    assert s.nll_ref == pytest.approx(nll_ref, rel=1e-12)
    assert s.nll_art == pytest.approx(nll_art, rel=1e-12)


def test_first_token_kld_written_out():
    """Token 0 by hand, term by term, as a check on the helper itself."""
    ep = [math.exp(2.0), math.exp(1.0), math.exp(0.0), math.exp(-1.0)]
    eq = [math.exp(1.5), math.exp(1.0), math.exp(0.5), math.exp(-1.0)]
    zp, zq = sum(ep), sum(eq)
    expected = sum((a / zp) * (math.log(a / zp) - math.log(b / zq)) for a, b in zip(ep, eq))
    s = _stats()
    assert s.kld[0] == pytest.approx(expected, rel=1e-12)


def test_summary_matches_hand():
    kld, same, dp, nll_ref, nll_art = _hand()
    m = summarize(_stats())
    assert isinstance(m, LogitMetrics)
    assert m.tokens == 3
    assert m.kld_mean == pytest.approx(sum(kld) / 3, rel=1e-12)
    assert m.kld_max == pytest.approx(max(kld), rel=1e-12)
    # Three values: p99 sits at position 1.98 of the sorted values, p99.9 at 1.998.
    k = sorted(kld)
    assert m.kld_p99 == pytest.approx(k[1] + 0.98 * (k[2] - k[1]), rel=1e-12)
    assert m.kld_p999 == pytest.approx(k[1] + 0.998 * (k[2] - k[1]), rel=1e-12)
    assert m.kld_p99 == pytest.approx(linear_quantile(kld, 0.99), rel=1e-12)
    assert m.kld_p99 < m.kld_p999 < m.kld_max
    assert m.top1_agreement == pytest.approx(2 / 3, rel=1e-15)
    assert m.rms_dp == pytest.approx(math.sqrt(sum(d * d for d in dp) / 3), rel=1e-12)
    ppl_ref = math.exp(sum(nll_ref) / 3)
    ppl_art = math.exp(sum(nll_art) / 3)
    assert m.ppl_ref == pytest.approx(ppl_ref, rel=1e-12)
    assert m.ppl_artifact == pytest.approx(ppl_art, rel=1e-12)
    assert m.ppl_ratio == pytest.approx(ppl_art / ppl_ref, rel=1e-12)
    assert m.max_logit_diff is None


def test_ppl_is_exp_of_mean_nll():
    """Uniform reference over 4 words: PPL exactly 4; an artifact giving the true token 1/2 has PPL 2."""
    ref = [[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]
    art = [[math.log(3.0), 0.0, 0.0, 0.0], [5.0, 5.0 + math.log(3.0), 5.0, 5.0]]  # true token gets 3/6 = 1/2
    s = TokenStats.empty()
    s.add(np.array(ref), np.array(art), np.array([0, 1]))
    m = summarize(s)
    assert m.ppl_ref == pytest.approx(4.0, rel=1e-13)
    assert m.ppl_artifact == pytest.approx(2.0, rel=1e-13)
    assert m.ppl_ratio == pytest.approx(0.5, rel=1e-13)
    assert m.rms_dp == pytest.approx(0.25, rel=1e-13)  # 1/2 - 1/4 on both tokens
    # KL(uniform || (1/2, 1/6, 1/6, 1/6)) = 1/4 log(1/2) + 3/4 log(3/2), with p log(p/q) = 1/4 log((1/4)/q).
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.25 / (1 / 6))
    assert m.kld_mean == pytest.approx(expected, rel=1e-12)
    assert m.kld_max == pytest.approx(expected, rel=1e-12)
    assert m.top1_agreement == 0.5  # row 0: the reference's uniform row argmaxes to 0, as does the artifact


def test_percentiles_over_many_tokens():
    """np.quantile's linear interpolation over 11 KLD values 0, 0.1, ..., 1.0: p99 = 0.99, p99.9 = 0.999."""
    s = TokenStats.empty()
    s.kld.extend([i / 10 for i in range(11)])
    s.same_top1.extend([True] * 11)
    s.dp.extend([0.0] * 11)
    s.nll_ref.extend([1.0] * 11)
    s.nll_art.extend([1.0] * 11)
    m = summarize(s)
    assert m.tokens == 11
    assert m.kld_mean == pytest.approx(0.5, rel=1e-14)
    assert m.kld_p99 == pytest.approx(0.99, rel=1e-13)
    assert m.kld_p999 == pytest.approx(0.999, rel=1e-13)
    assert m.kld_max == 1.0
    assert m.ppl_ref == pytest.approx(math.e, rel=1e-14) and m.ppl_ratio == 1.0


def test_max_logit_diff_passes_through():
    m = summarize(_stats(), max_logit_diff=0.25)
    assert m.max_logit_diff == 0.25
    assert m.to_json()["max_logit_diff"] == 0.25
    assert summarize(_stats(), None).to_json()["max_logit_diff"] is None


def test_to_json_has_every_field():
    d = summarize(_stats(), 1.5).to_json()
    assert set(d) == {"tokens", "kld_mean", "kld_p99", "kld_p999", "kld_max", "top1_agreement", "rms_dp", "ppl_ref",
                      "ppl_artifact", "ppl_ratio", "max_logit_diff"}
    assert d["tokens"] == 3


# ---- identical logits, clamping, errors ---------------------------------------------------------------------------


def test_identical_logits():
    logits = np.array(REF)
    s = TokenStats.empty()
    s.add(logits, logits.copy(), np.array(TARGETS))
    m = summarize(s)
    assert all(k == 0.0 for k in s.kld)
    assert m.kld_mean == 0.0 and m.kld_max == 0.0 and m.kld_p99 == 0.0 and m.kld_p999 == 0.0
    assert m.top1_agreement == 1.0
    assert m.rms_dp == 0.0
    assert m.ppl_ratio == 1.0
    assert m.ppl_ref == m.ppl_artifact


def test_kld_never_negative():
    """KL >= 0; a float sum over nearly identical rows can round below 0, and the metric clamps it at 0. The first row
    is one such case (the unclamped float64 sum comes out near -3e-19)."""
    ref = [[0.126, -0.132, 0.64, 0.105]]
    art = [[0.126000001, -0.132, 0.64, 0.105]]
    rng = np.random.default_rng(0)
    r = rng.normal(size=(200, 4)).round(3)
    ref_all = np.concatenate([np.array(ref), r])
    art_all = np.concatenate([np.array(art), r + np.array([1e-9, 0, 0, 0])])
    s = TokenStats.empty()
    s.add(ref_all, art_all, np.zeros(len(ref_all), dtype=int))
    assert min(s.kld) >= 0.0
    assert max(s.kld) < 1e-15
    assert 0.0 <= s.kld[0] < 1e-15
    assert summarize(s).kld_mean >= 0.0


def test_shape_mismatch_raises():
    s = TokenStats.empty()
    with pytest.raises(ValueError, match="logit shapes differ"):
        s.add(np.zeros((2, 4)), np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="logit shapes differ"):
        s.add(np.zeros((2, 4)), np.zeros((3, 4)), np.array([0, 1]))
    assert s.kld == [] and s.nll_ref == []  # nothing recorded


def test_empty_stats_raise():
    with pytest.raises(ValueError, match="no tokens were scored"):
        summarize(TokenStats.empty())


# ---- greedy generations -------------------------------------------------------------------------------------------


def test_identical_generations():
    g = compare_generations([[5, 6, 7, 8]], [[5, 6, 7, 8]], 4, [("p", "a", "a")])
    assert isinstance(g, GenerationMetrics)
    assert g.prompts == 1 and g.new_tokens == 4
    assert g.exact_match_rate == 1.0
    assert g.mean_first_divergence == 4.0


def test_identical_short_generations_count_as_new_tokens():
    """Both stopped early (end of turn) on the same tokens: identical, so the divergence is the full new_tokens."""
    g = compare_generations([[5, 6]], [[5, 6]], 8, [])
    assert g.exact_match_rate == 1.0 and g.mean_first_divergence == 8.0


@pytest.mark.parametrize("k", [0, 1, 3])
def test_divergence_at_k(k):
    ref = [10, 11, 12, 13]
    art = list(ref)
    art[k] = 99
    g = compare_generations([ref], [art], 4, [])
    assert g.exact_match_rate == 0.0
    assert g.mean_first_divergence == float(k)


def test_prefix_diverges_where_shorter_ends():
    g = compare_generations([[1, 2, 3, 4]], [[1, 2]], 4, [])
    assert g.exact_match_rate == 0.0 and g.mean_first_divergence == 2.0
    g = compare_generations([[1, 2]], [[1, 2, 3, 4]], 4, [])
    assert g.exact_match_rate == 0.0 and g.mean_first_divergence == 2.0
    g = compare_generations([[1, 2, 3]], [[]], 3, [])
    assert g.mean_first_divergence == 0.0


def test_several_prompts_averaged():
    ref = [[1, 2, 3, 4], [1, 2, 3, 4], [7, 8, 9, 9], [4, 4, 4, 4]]
    art = [[1, 2, 3, 4], [1, 2, 0, 4], [7, 8, 9], [5, 4, 4, 4]]
    texts = [(f"prompt {i}", f"ref {i}", f"art {i}") for i in range(4)]
    g = compare_generations(ref, art, 4, texts)
    # firsts: identical -> 4, diverges at 2, prefix ends at 3, diverges at 0
    assert g.prompts == 4
    assert g.exact_match_rate == 0.25
    assert g.mean_first_divergence == pytest.approx((4 + 2 + 3 + 0) / 4, rel=1e-15)
    assert g.samples == [{"prompt": p, "reference": r, "artifact": a} for p, r, a in texts]
    d = g.to_json()
    assert d["exact_match_rate"] == 0.25 and d["samples"][1]["prompt"] == "prompt 1"


def test_no_prompts():
    g = compare_generations([], [], 16, [])
    assert g.prompts == 0 and g.exact_match_rate == 0.0 and g.mean_first_divergence == 0.0


# ---- near-ties and the compact reference ---------------------------------------------------------------------------


def test_a_divergence_on_a_near_tie_is_reported_not_counted():
    ref = [[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]]
    art = [[5, 6, 7, 8], [5, 9, 7, 8], [5, 6, 4, 8]]
    # the reference's margins and second choices: step 1 of prompt 2 is a near-tie won by 6 over 9; step 2 of
    # prompt 3 is not (margin 0.5), so taking 4 there is a real divergence
    choices = [([1.0, 1.0, 1.0, 1.0], [1, 1, 1, 1]), ([1.0, 0.004, 1.0, 1.0], [1, 9, 1, 1]),
               ([1.0, 1.0, 0.5, 1.0], [1, 1, 4, 1])]
    texts = [("p", "r", "a")] * 3
    g = compare_generations(ref, art, 4, texts, choices)
    assert g.exact_match_rate == pytest.approx(1 / 3) and g.near_ties == 1
    assert g.agreement_rate == pytest.approx(2 / 3)
    assert g.mean_first_divergence == pytest.approx((4 + 1 + 2) / 3)
    assert g.mean_first_divergence_ties_ok == pytest.approx((4 + 4 + 2) / 3)
    assert g.samples[1]["near_tie_at"] == 1 and "near_tie_at" not in g.samples[2]
    # a near-tie margin, but the artifact took neither of the reference's two choices: a real divergence
    g = compare_generations([[5, 6]], [[5, 3]], 2, texts, [([1.0, 0.001], [1, 9])])
    assert g.near_ties == 0 and g.agreement_rate == 0.0


def test_compact_kld_by_hand():
    from gemma4_export.validate.refdata import CompactRows

    ref_row = [2.0, 1.0, 0.0, -1.0, -3.0]
    art_row = [1.5, 1.2, 0.3, -1.0, -2.0]
    p, q = softmax(ref_row), softmax(art_row)
    lse = math.log(sum(math.exp(x) for x in ref_row))
    # stored: the two most likely tokens; the other three are one bucket
    rows = CompactRows(np.array([0, 2]), np.array([0, 1], dtype=np.int32),
                       np.array([math.log(p[0]), math.log(p[1])], dtype=np.float32),
                       np.array([math.log(p[3])], dtype=np.float32), np.array([lse]))
    st = TokenStats.empty()
    diff = st.add_compact(rows, np.array([art_row], dtype=np.float32), np.array([3]))
    pr, qr = sum(p[2:]), sum(q[2:])
    want = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1]) + pr * math.log(pr / qr)
    assert st.kld[0] == pytest.approx(want, rel=1e-5)
    assert want <= kl(p, q)  # the bucket makes it a lower bound
    assert st.same_top1 == [True]
    assert st.nll_ref[0] == pytest.approx(-math.log(p[3]), rel=1e-5)
    assert st.nll_art[0] == pytest.approx(-math.log(q[3]), rel=1e-6)
    assert st.dp[0] == pytest.approx(q[3] - p[3], abs=1e-6)
    assert diff == pytest.approx(max(abs(ref_row[0] - art_row[0]), abs(ref_row[1] - art_row[1])), abs=1e-5)
