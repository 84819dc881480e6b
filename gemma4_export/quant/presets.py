"""Every preset of every target, each with all of its facts in one place: the types it offers the rules (its slots),
its file type where the format records one, and the thresholds its artifacts are validated against.

Adding a preset is one entry here; a test fails when a preset lacks any of its facts.

How the thresholds were chosen: `python scripts/calibrate.py --target gguf` (and `--target onnx`, `--target mlx`)
exports every tiny variant at every preset and validates it against the float32 reference on the same held-out
windows (8 x 256 tokens, second halves scored, 1,016 tokens) and 8 chat prompts x 64 greedy tokens;
docs/thresholds-{gguf,onnx,mlx}.md have the tables. Presets under 8 bits are measured calibrated (the default) and
plain (--no-calibrate), and the worst of the two sets the limit; the GGUF presets added with calibration (q5_k_s,
q4_k_s, iq4_xs, q3_k_m, q2_k) were set that way, the older ones kept their limits, which the calibrated exports
meet with room. Each limit sits at about 2x the worst variant's measured value
(KLD, 1 - top-1, PPL excess) and the greedy limits at about half the worst, rounded; a real defect (a wrong layout,
a wrong type, a missing scale) moves these metrics by orders of magnitude, not by 2x. Float presets were also
measured on a synthetic checkpoint with E2B's real widths (the one scripts/bench_export.py builds): wider rows and
longer windows round more, and llama.cpp's float16 GELU table shows there, so the f32 GGUF and fp32/fp16 ONNX limits
come from that measurement.

The greedy exact-match floor is 0.0 where the worst tiny variant measured 0 of 8 prompts identical (the 4-bit and
8-bit-MLX presets): quantization at that size changes some token in every 64-token continuation of a small model,
so no floor above 0 can be set from the measurement. Those presets' generation check is the mean first divergence,
which is above 0 for every preset and does fail on a broken artifact (tests/test_negative_controls.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..validate.thresholds import Thresholds


@dataclass(frozen=True)
class Preset:
    """One preset: the types it offers the rules (slots, not roles: a rule picks the slot that fits a tensor), and its
    other facts."""

    name: str
    target: str
    base: str  # every matrix not named by another rule
    embed: str  # the token embedding; tied, so it is also the output head
    ple_table: str  # default for the PLE table (override with ple_type)
    high: str  # what "kept high" means in this preset: the PLE gate and projection
    ple_model_proj: str  # the PLE model projection (llama.cpp never quantizes it; others keep it high)
    full: str  # full precision: norms, layer scalars, the MoE router
    thresholds: Thresholds
    more_bits: str | None = None  # K-quant style mixes: values and down projections on the layers given more bits
    file_type: str | None = None  # the format's own name for the whole file's type (GGUF: a LlamaFileType member)
    description: str = ""
    mix: str = ""  # which layers' values / down projections get more bits (rules._more_bits): "k_m", "k_s", ...

    @property
    def slots(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in ("base", "embed", "ple_table", "high", "ple_model_proj", "full",
                                              "more_bits")}


T = Thresholds


def _gguf(name, base, embed, ple_table, high, ple_proj, thresholds, file_type, more_bits=None, description="",
          mix=None):
    return Preset(name, "gguf", base, embed, ple_table, high, ple_proj, "F32", thresholds, more_bits, file_type,
                  description, mix if mix is not None else ("k_m" if more_bits else ""))


def _onnx(name, base, embed, ple_table, high, ple_proj, thresholds, description=""):
    return Preset(name, "onnx", base, embed, ple_table, high, ple_proj, "FP32", thresholds, None, None, description)


def _mlx(name, bits, embed_bits, high_bits, thresholds, more_bits=None, group=64, description=""):
    q = lambda b: "BF16" if b is None else f"Q{b}G{group}"  # noqa: E731
    return Preset(name, "mlx", q(bits), q(embed_bits), q(bits), q(high_bits), q(high_bits), "BF16", thresholds,
                  q(more_bits) if more_bits else None, None, description, "k_m" if more_bits else "")


PRESET_LIST: tuple[Preset, ...] = (
    # GGUF presets, named as llama.cpp users know them. The token embedding of a K-quant or Q4_0 file gets Q6_K, as
    # llama.cpp's own quantizer gives the output head (Gemma's embedding is tied, so it is the output head).
    # f32 worst measured (docs/thresholds-gguf.md): KLD 3.6e-8 and max logit diff 0.0085 on the tiny models, but on
    # a checkpoint with E2B's real widths KLD 9.6e-5, p99.9 1.6e-3, max logit diff 0.30, top-1 0.9995, PPL ratio
    # 1.00057, greedy 8/8 identical. The cause is llama.cpp's compute, not the file: ggml's CPU GELU reads a float16
    # table, and the reference with that same float16 GELU differs from the float32 one by the same KLD (4.7e-5 on
    # one window). The limits are 2x the real-width values; the tests hold the tiny models to their own bounds.
    _gguf("f32", "F32", "F32", "F32", "F32", "F32", T(2e-4, 4e-3, 0.999, 1.0012, 1.0, 64, max_logit_diff=0.6),
          "ALL_F32", description="everything at 32-bit float"),
    # bf16 weights are the checkpoint's own; the error is llama.cpp's bf16 compute (MoE routing flips on 26B).
    _gguf("bf16", "BF16", "BF16", "BF16", "BF16", "BF16", T(1.2e-4, 4e-2, 0.985, 1.001, 0.375, 30), "MOSTLY_BF16",
          description="bfloat16 matrices, as trained"),
    _gguf("f16", "F16", "F16", "F16", "F16", "F16", T(2e-5, 3e-4, 0.995, 1.0005, 0.75, 48), "MOSTLY_F16",
          description="float16 matrices"),
    _gguf("q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0", "BF16", T(2e-3, 0.12, 0.97, 1.003, 0.375, 25), "MOSTLY_Q8_0",
          description="8-bit blocks of 32"),
    _gguf("q6_k", "Q6_K", "Q6_K", "Q6_K", "Q8_0", "BF16", T(5e-3, 0.25, 0.93, 1.006, 0.125, 17), "MOSTLY_Q6_K",
          description="6-bit K-quant"),
    _gguf("q5_k_m", "Q5_K", "Q6_K", "Q5_K", "Q8_0", "BF16", T(8e-3, 0.45, 0.89, 1.012, 0.125, 14), "MOSTLY_Q5_K_M",
          "Q6_K", "5-bit K-quant mix"),
    _gguf("q4_k_m", "Q4_K", "Q6_K", "Q4_K", "Q8_0", "BF16", T(1.5e-2, 0.5, 0.86, 1.017, 0.0, 9), "MOSTLY_Q4_K_M",
          "Q6_K", "4-bit K-quant mix"),
    _gguf("q5_k_s", "Q5_K", "Q6_K", "Q5_K", "Q8_0", "BF16", T(8e-3, 0.45, 0.89, 1.011, 0.125, 12), "MOSTLY_Q5_K_S",
          description="5-bit K-quant"),
    _gguf("q4_k_s", "Q4_K", "Q6_K", "Q4_K", "Q8_0", "BF16", T(1.4e-2, 0.5, 0.84, 1.023, 0.0, 8), "MOSTLY_Q4_K_S",
          description="4-bit K-quant, more bits for the first layers' values and down projections", mix="k_s"),
    _gguf("iq4_xs", "IQ4_XS", "Q6_K", "IQ4_XS", "Q8_0", "BF16", T(1.7e-2, 0.6, 0.83, 1.009, 0.0, 3),
          "MOSTLY_IQ4_XS", description="4.25-bit non-linear blocks of 256", mix="iq4_xs"),
    _gguf("q4_0", "Q4_0", "Q6_K", "Q4_0", "Q8_0", "BF16", T(2.1e-2, 0.7, 0.83, 1.014, 0.0, 6), "MOSTLY_Q4_0",
          description="4-bit blocks of 32"),
    # QAT checkpoints (quant/lattice.py): every tensor found on a 4-bit lattice is written on it as Q4_0 blocks with
    # the trained steps; the rest as q4_0 (the tied head Q6_K, as Google's own QAT GGUFs keep it). Its limits are
    # q4_0's, since a checkpoint off the lattice gets a plain 4-bit file; on a lattice checkpoint the lattice
    # tensors are lossless (tests/test_qat.py reads them back bit for bit and holds the exactly-on-lattice form to
    # the bf16 limits; to q8_0's on the MoE model, where llama.cpp's 8-bit activations flip experts).
    _gguf("qat", "Q4_0", "Q6_K", "Q4_0", "Q8_0", "BF16", T(2.1e-2, 0.7, 0.83, 1.014, 0.0, 6), "MOSTLY_Q4_0",
          description="a QAT checkpoint's 4-bit lattice, kept (Q4_0 with the trained steps)"),
    _gguf("q3_k_m", "Q3_K", "Q6_K", "Q3_K", "Q8_0", "BF16", T(3.3e-2, 0.7, 0.72, 1.03, 0.0, 5), "MOSTLY_Q3_K_M",
          description="3-bit K-quant mix", mix="q3_k_m"),
    _gguf("q2_k", "Q2_K", "Q6_K", "Q2_K", "Q8_0", "BF16", T(7.2e-2, 0.9, 0.62, 1.08, 0.0, 5), "MOSTLY_Q2_K",
          description="2-bit K-quant mix, calibrated only", mix="q2_k"),
    # ONNX: float weights, or block-wise MatMulNBits / GatherBlockQuantized (blocks of 32) for int8 and int4.
    # fp32, int8 and int4 compute in float32. fp32 is held to float rounding: worst measured KLD 1.4e-12; max logit
    # difference 3.3e-5 on the tiny models, 2.5e-3 on a checkpoint with E2B's real widths over 1,024-token windows
    # (longer float32 sums), so the limit is 2x that (docs/thresholds-onnx.md).
    _onnx("fp32", "FP32", "FP32", "FP32", "FP32", "FP32", T(1e-8, 1e-7, 0.999, 1.0001, 1.0, 64, max_logit_diff=5e-3),
          description="32-bit float"),
    # fp16 and q4f16 compute in float16 (for providers that do: WebGPU, CUDA, CoreML), so their limits are float16
    # rounding's, measured on onnxruntime's CPU kernels: fp16 worst KLD 3.5e-7, max logit difference 0.034.
    _onnx("fp16", "FP16", "FP16", "FP16", "FP16", "FP16", T(7e-7, 2e-5, 0.996, 1.0001, 0.875, 32, max_logit_diff=7e-2),
          description="float16 weights and compute (float32 norms, RoPE angles)"),
    _onnx("int8", "INT8", "INT8", "INT8", "INT8", "INT8", T(5e-4, 7e-2, 0.97, 1.001, 0.375, 28),
          description="8-bit blocks of 32"),
    _onnx("int4", "INT4", "INT8", "INT4", "INT8", "INT8", T(1.9e-2, 0.65, 0.85, 1.014, 0.0, 10),
          description="4-bit blocks of 32, 8-bit head"),
    _onnx("q4f16", "INT4", "INT8", "INT4", "INT8", "INT8", T(1.9e-2, 0.65, 0.84, 1.017, 0.0, 10),
          description="int4's weights, float16 compute (for fp16 providers: WebGPU, CUDA, CoreML)"),
    _onnx("qat", "INT4", "INT8", "INT4", "INT8", "INT8", T(1.9e-2, 0.65, 0.85, 1.014, 0.0, 10),
          description="a QAT checkpoint's 4-bit lattice, kept (scale = trained step, zero point 8); else int4"),
    # MLX affine quantization as mlx-lm names it (group size 64 here; --group-size makes others). The tied
    # embedding / output head is 8-bit in the 4-bit presets (4bit, mixed), as mlx-lm quantizes it too: with float32
    # sums, the arithmetic of mlx's Metal kernels (validate/mlxrt.py), a Q8G64 head costs the 4bit preset 0-2% of KLD
    # for 3.5-12% fewer bytes on the tiny models (tiny-31b 0.00359 against 0.00352 with a bf16 head), 377 MB of the
    # real E2B's 3.2 GB. mlx's CPU kernels sum in bf16, which costs a quantized head far more (tiny-e2b 4bit 0.0050
    # against 0.0023 with a bf16 head); the 4-bit limits below are measured that way (validate's default on a CPU,
    # docs/thresholds-mlx.md), so they hold on either. 8bit and 6bit keep the head bf16: with the CPU's sums an 8-bit
    # head alone costs those presets three to four times their KLD (tiny-12b 8bit 0.0035 against 0.0010, PPL ratio
    # 1.0098), so their limits could no longer tell them from a 4-bit model on a CPU; `--tensor-type
    # 'embed_tokens\.weight$=Q8G64'` quantizes it. `qat` keeps the head as trained (bf16): it is the faithful form of
    # a QAT checkpoint, whose head is not on the lattice.
    # mlx-lm computes in bf16, so even bf16 weights give KLD ~2e-4; MoE tails widest (docs/thresholds-mlx.md).
    # The PPL-ratio limits of the quantized presets follow the same rule (2x the worst excess) with tiny-e2b-ft in
    # the measured set: with bf16 heads that fine-tune was the most PPL-sensitive model under mlx-lm (4bit 1.0102,
    # 8bit 1.0024, 6bit 1.0037, mixed 1.0080); with their 8-bit head the 4-bit presets' worst is tiny-31b (1.0128,
    # 1.0118; the fine-tune 1.0126 plain). The cause is measured, not guessed: the same 4bit weights run with float32
    # activations give 1.0063, and the bf16 weights with float32 activations match the reference exactly (KLD 2e-12),
    # so the excess is 4-bit weights compounded by mlx-lm's bf16 compute, not the export.
    _mlx("bf16", None, None, None, T(5e-4, 5e-2, 0.96, 1.002, 0.25, 22), description="bfloat16, as trained"),
    _mlx("8bit", 8, None, 8, T(5e-3, 0.35, 0.925, 1.005, 0.0, 9), description="8-bit affine, bf16 tied head"),
    _mlx("6bit", 6, None, 8, T(6e-3, 0.25, 0.91, 1.0075, 0.0, 11),
         description="6-bit affine, 8-bit PLE projections, bf16 tied head"),
    _mlx("4bit", 4, 8, 8, T(2.5e-2, 0.5, 0.78, 1.026, 0.0, 4),
         description="4-bit affine, 8-bit PLE projections and tied head"),
    _mlx("qat", 4, None, 8, T(2e-2, 0.35, 0.83, 1.021, 0.0, 8), group=32,
         description="a QAT checkpoint's 4-bit lattice, kept (groups of 32, scale = trained step, bias = -8 step)"),
    _mlx("mixed", 4, 8, 8, T(2.5e-2, 0.47, 0.79, 1.024, 0.0, 5), more_bits=6,
         description="4-bit with 6-bit values/down projections on the layers a K-quant mix favours, 8-bit PLE "
                     "projections and tied head"),
)
PRESETS: dict[tuple[str, str], Preset] = {(p.target, p.name): p for p in PRESET_LIST}


def presets_of(target: str) -> list[str]:
    return [n for t, n in PRESETS if t == target]
