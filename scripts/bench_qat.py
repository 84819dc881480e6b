"""Benchmark: QAT checkpoints exported on their trained 4-bit lattice against the plain 4-bit exports, per target.

    python scripts/bench_qat.py [--variants tiny-e2b-qat tiny-26b-a4b-qat] [--only gguf,mlx,onnx] [--out DIR]

The reference is the QAT checkpoint itself in fp32 (the lattice values it stores), not the model it was trained
from. On the shipped tiny QAT checkpoints (scripts/build_tiny.py --qat: every decoder matrix trained with learned
per-group steps on a 4-bit lattice), side by side at the same or smaller size:

  GGUF  ours `qat` (lattice tensors as Q4_0 with the trained steps; the head Q6_K as Google's QAT GGUFs keep it,
        the rest as q4_0), the same with a Q8_0 head (the head policy, measured), plain Q4_0 (`q4_0 --qat off
        --no-calibrate`: ggml's own quantizer, byte for byte what llama-quantize Q4_0 writes), Q4_0 with our imatrix
        and Q4_K_M with our imatrix (`--qat off --no-gptq`: what llama-quantize --imatrix writes with that imatrix,
        which tests/test_gguf.py checks byte for byte), and ours q4_0 / q4_k_m `--qat off` (calibrated with GPTQ's
        error feedback, the default).
  MLX   ours `qat` (affine groups of 32: scale = step, bias = -8 step), `mlx_lm convert -q --q-bits 4` with groups
        of 64 (the published mlx-community QAT builds' recipe; the baseline) and of 32, and ours 4bit --qat off
        (calibrated, GPTQ, its 8-bit head).
  ONNX  ours `qat` (MatMulNBits, scale = step, zero point 8) against int4 --qat off --no-calibrate (onnxruntime's
        round-to-nearest; the baseline) and int4 --qat off calibrated (GPTQ).

Everything is measured as scripts/bench_quality.py measures (its harness and held-out text: mean KLD, top-1, PPL
ratio, greedy exact match over the float32 reference); prints a Markdown table and writes bench_qat.json. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
bq = importlib.util.module_from_spec(_spec)
sys.modules["bench_quality"] = bq
_spec.loader.exec_module(bq)

from gemma4_export import api  # noqa: E402
from gemma4_export.exporter.variants import TINY_QAT, get_variant  # noqa: E402

HEAD_Q8 = r"embed_tokens\.weight$=Q8_0"
HEAD_MLX8 = r"embed_tokens\.weight$=Q8G32"  # `qat` keeps the tied head as trained (bf16); 4bit makes it Q8G64
HEAD_MLX4 = r"embed_tokens\.weight$=Q4G32"


class QatBench(bq.Bench):
    def add(self, variant, group, label, *args, **kw):
        if self.a.rows and not any(x in label for x in self.a.rows):
            return None
        return super().add(variant, group, label, *args, **kw)

    def variant(self, v: str) -> None:
        ck = get_variant(v).local_dir
        with bq.Step(v, "fp32 reference (held-out text)"):
            ref = api.reference(v)
        params = int(ref.meta["text_parameters"])
        only = self.a.only
        if "gguf" in only:
            g = "gguf 4-bit"
            self.add(v, g, "ours qat (lattice Q4_0, head Q6_K)", "gemma4-export", self.ours("gguf", v, "qat", "g-qat"),
                     ref, params, True, tag="qat")
            self.add(v, g, "ours qat, head Q8_0", "gemma4-export",
                     self.ours("gguf", v, "qat", "g-qat-q8head", overrides=[HEAD_Q8]), ref, params, True,
                     tag="qat q8 head")
            self.add(v, g, "plain Q4_0 (ggml's quantizer, no imatrix)", "llama.cpp",
                     self.ours("gguf", v, "q4_0", "g-q4_0", calibrate=False, qat="off"), ref, params, True,
                     baseline=True, tag="q4_0")
            self.add(v, g, "Q4_0 + imatrix", "llama.cpp + imatrix",
                     self.ours("gguf", v, "q4_0", "g-q4_0-imat", qat="off", gptq=False), ref, params, True,
                     tag="q4_0 imat")
            self.add(v, g, "ours q4_0 --qat off (GPTQ)", "gemma4-export",
                     self.ours("gguf", v, "q4_0", "g-q4_0-gptq", qat="off"), ref, params, True, tag="q4_0 gptq")
            self.add(v, g, "plain Q4_0, head Q8_0", "llama.cpp",
                     self.ours("gguf", v, "q4_0", "g-q4_0-q8head", calibrate=False, qat="off", overrides=[HEAD_Q8]),
                     ref, params, True, tag="q4_0 q8 head")
            self.add(v, g, "Q4_0 + imatrix, head Q8_0", "llama.cpp + imatrix",
                     self.ours("gguf", v, "q4_0", "g-q4_0-imat-q8head", qat="off", overrides=[HEAD_Q8], gptq=False),
                     ref, params, True, tag="q4_0 imat q8 head")
            self.add(v, g, "ours q4_0 --qat off (GPTQ), head Q8_0", "gemma4-export",
                     self.ours("gguf", v, "q4_0", "g-q4_0-gptq-q8head", qat="off", overrides=[HEAD_Q8]), ref, params,
                     True, tag="q4_0 gptq q8 head")
            self.add(v, g, "Q4_K_M + imatrix", "llama.cpp + imatrix",
                     self.ours("gguf", v, "q4_k_m", "g-q4_k_m-imat", qat="off", gptq=False), ref, params, True,
                     tag="q4_k_m imat")
            self.add(v, g, "ours q4_k_m --qat off (GPTQ)", "gemma4-export",
                     self.ours("gguf", v, "q4_k_m", "g-q4_k_m-gptq", qat="off"), ref, params, True, tag="q4_k_m gptq")
        if "mlx" in only:
            g = "mlx 4-bit"
            self.add(v, g, "ours qat (lattice, groups of 32)", "gemma4-export", self.ours("mlx", v, "qat", "m-qat"),
                     ref, params, True, tag="qat")
            self.add(v, g, "ours qat, head 8-bit", "gemma4-export", self.ours("mlx", v, "qat", "m-qat-h8",
                                                                           overrides=[HEAD_MLX8]),
                     ref, params, True, tag="qat h8")
            self.add(v, g, "ours qat, head 4-bit g32", "gemma4-export",
                     self.ours("mlx", v, "qat", "m-qat-h4", overrides=[HEAD_MLX4]), ref, params, True, tag="qat h4")
            self.add(v, g, "ours 4bit --qat off", "gemma4-export",
                     self.ours("mlx", v, "4bit", "m-4bit", qat="off"), ref, params, True, tag="4bit")
            if importlib.util.find_spec("mlx_lm") is not None:
                w = self.work / v / "mlx_lm"
                hf = bq.patched_copy(ck, w / "hf", bq.mlx_lm_config)

                def convert(group: int):
                    def make():
                        out = w / f"4bit-g{group}"
                        shutil.rmtree(out, ignore_errors=True)
                        bq.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", hf, "--mlx-path", out, "-q",
                                "--q-bits", "4", "--q-group-size", str(group)], w / f"g{group}.log")
                        return out
                    return make

                self.add(v, g, "mlx_lm.convert 4-bit g64", "mlx_lm.convert", convert(64), ref, params, False,
                         baseline=True, tag="g64")
                self.add(v, g, "mlx_lm.convert 4-bit g32", "mlx_lm.convert", convert(32), ref, params, False,
                         tag="g32")
            else:
                self.skipped[f"{v} mlx_lm.convert"] = "mlx-lm is not installed"
        if "onnx" in only:
            g = "onnx int4"
            self.add(v, g, "ours qat (lattice blocks of 32)", "gemma4-export", self.ours("onnx", v, "qat", "o-qat"),
                     ref, params, True, tag="qat")
            self.add(v, g, "int4 round-to-nearest (onnxruntime's)", "onnxruntime RTN",
                     self.ours("onnx", v, "int4", "o-int4-rtn", calibrate=False, qat="off"), ref, params, True,
                     baseline=True, tag="rtn")
            self.add(v, g, "int4 calibrated --qat off", "gemma4-export",
                     self.ours("onnx", v, "int4", "o-int4-cal", qat="off"), ref, params, True, tag="int4 cal")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=list(TINY_QAT))
    ap.add_argument("--only", default="gguf,mlx,onnx")
    ap.add_argument("--out", default="bench-qat")
    ap.add_argument("--work", default=None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--mlx-accumulate", choices=("float32", "native"), default="float32",
                    help="how mlx sums the MLX rows' quantized matmuls on the CPU (as scripts/bench_quality.py)")
    ap.add_argument("--rows", nargs="*", help="only the rows whose label contains one of these")
    ap.add_argument("--merge", nargs="*", default=[], help="earlier bench_qat.json files whose rows join the table")
    a = ap.parse_args()
    a.only = set(a.only.split(","))
    a.llama_cpp = a.llama_bin = None
    a.reuse = []  # every row is made here
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    b = QatBench(a)
    b.skipped.pop("llama.cpp", None)  # this benchmark makes every GGUF with ggml's kernels through gemma4-export
    for f in a.merge:  # a row measured again (same variant and label) replaces the earlier one
        for r in json.loads(Path(f).read_text())["rows"]:
            b.rows = [x for x in b.rows if (x.variant, x.label) != (r["variant"], r["label"])] + [bq.Row(**r)]
    def save() -> None:
        b.compare()
        (out / "bench_qat.json").write_text(json.dumps({"rows": [asdict(r) for r in b.rows], "skipped": b.skipped,
                                                        "versions": bq.versions()}, indent=2) + "\n")
    for v in a.variants:
        b.variant(v)
        save()  # after every variant, so that a run cut short leaves what it measured
    save()
    print(b.table())


if __name__ == "__main__":
    main()
