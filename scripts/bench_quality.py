"""Benchmark: the quality of gemma4-export's quantized artifacts against the reference tools' own, at (near) equal size.

    python scripts/bench_quality.py [--variants tiny-e2b ...] [--only gguf,mlx,onnx] [--gguf-presets q4_k_m ...]
        [--llama-cpp LLAMA_CPP_TREE --llama-bin LLAMA_CPP_BINARIES] [--out DIR] [--work DIR] [--merge JSON ...]

`--reuse` takes from an earlier run the rows a change to the calibrated quantizers cannot move (the reference tools',
ours --no-calibrate); every calibrated row of ours is made and measured again. `--merge` reports earlier runs' rows
with this run's (`--variants` with no names runs nothing: the table and the
plot of what was measured, for instance one target measured again after a change).

For every variant (default: every tiny one) it makes, side by side:

  GGUF  ours at q4_k_m, q3_k_m, q4_k_s, iq4_xs and q2_k, calibrated (the default) and --no-calibrate (not q2_k, which
        is only made calibrated); llama.cpp's own: `convert_hf_to_gguf.py --outtype bf16`, then `llama-quantize` with
        the same type, plain (not Q2_K) and with `llama-imatrix`'s importance matrix (the baseline of each group).
        When `api.export` takes `max_size`, also ours at the size of llama.cpp's imatrix file (every preset):
        `--max-size` with that file's bytes, each tensor class's type chosen by measured sensitivity.
        A bf16 pair (ours, llama.cpp's converter) shows what the conversion alone costs.
  MLX   ours 4bit (calibrated and --no-calibrate) against `mlx_lm convert -q --q-bits 4 --q-group-size 64` (the
        baseline), --q-bits 4 --q-group-size 32 (5 bits a weight with its scales: the recipe nearest our 4bit's size,
        whose PLE projections and tied head are 8-bit) and --q-bits 5, and ours at exactly that 5-bit directory's
        size (`--max-size`, types chosen by measured sensitivity); on a checkpoint mlx-lm keeps in float32 (its
        config's dtype: tiny-e2b-ft), whose float32 scales make its g32 as large as its 5-bit, also its g32 and
        5-bit with `--dtype bfloat16` (bf16 scales, as ours) and ours at that 5-bit's size;
        ours mixed against mlx-lm's `--quant-predicate mixed_4_6` (and mixed_3_6, smaller).
  ONNX  ours int4 calibrated against int4 --no-calibrate, which is onnxruntime's own round-to-nearest quantizer
        (the baseline), and onnxruntime's HQQ (blocks of 64: float zero points, the same bytes), k-quant and GPTQ
        (asymmetric blocks of 32, up to 1.6% larger) on the same graph from our fp32 export's weights
        (scripts/bench_ort.py; GPTQ on the calibration tokens ours sees).

Both calibrations see the same tokens: ours measures the streamed fp32 model on the shipped calibration set
(quant/calibrate.py: 16 chunks of 1,024 tokens, cached under $GEMMA4_EXPORT_CACHE), and `llama-imatrix` gets that
very text (`shipped_text`, written to a file) with `-c 1024 --chunks 16`. Quality is measured on the held-out text
(validate/texts.py), disjoint from the calibration text, against one fp32 reference per variant (`api.reference`,
computed once): every artifact runs in its own runtime (llama.cpp, mlx-lm, onnxruntime) through the project's harness
(`validate.harness.run_validation`) on the same windows and prompts. Ours go through `validate_artifact`; the tools'
artifacts carry no gemma4-export provenance, which `validate_artifact` refuses, so they run through the target's own
runner directly (the same metrics, no thresholds).

MLX rows run with float32 sums in mlx's quantized matmuls (`--mlx-accumulate float32`, the default): the arithmetic
of mlx's Metal kernels, where MLX artifacts run. mlx's CPU kernels sum in the activations' dtype, so a bf16 artifact
carries hundreds of bf16 roundings per output that a float32 one (mlx-lm keeps a float32 checkpoint's dtype) does
not: that compares the kernels' arithmetic, not the quantization (validate/mlxrt.py). `--mlx-accumulate native`
measures mlx's CPU as it is.

Each row: size (MB, the artifact's bytes on disk), bits per weight (bytes x 8 over the text parameters the reports
use), mean KLD, top-1 agreement, PPL ratio, greedy exact match, and mean KLD over the group's baseline's; the size
column marks a pair more than 3% apart in size ("equal size" is within 3%). Prints a Markdown table, writes
bench_quality.json and bench_quality.svg (mean KLD against size, one panel per variant) to --out. Asserts nothing.

Workarounds, each in a copy of the checkpoint (symlinked files, an edited config.json):
- llama.cpp's converter reads `moe_intermediate_size` without a default (conversion/gemma.py: find_hparam without
  optional=True), so a dense config that omits the key (tiny-12b) stops with KeyError; the copy sets it to null.
- mlx-lm's gemma4 ModelArgs takes a top-level `vocab_size` (default 262,144) over text_config's, and defaults an
  absent `hidden_size_per_layer_input` to 256 (so it expects per-layer-input weights tiny-12b does not have, and stops
  with "Missing 21 parameters"); the copy for `mlx_lm convert` sets vocab_size to the text vocabulary and an absent
  hidden_size_per_layer_input to 0, which is what transformers and gemma4-export read it as; and it defaults an absent
  global_head_dim to 512, where a re-saved config (tiny-e2b-ft) gives the full layers' head dim in per_layer_config:
  the copy states it.
The converter makes the text model only (no --mmproj), so the towers' processor files are never needed.

Time, measured on 2 CPU cores shared with a test run: tiny-e2b takes about 25 minutes once the caches are warm (the
reference 20-110 s, llama-imatrix 7-100 s, each GGUF or ONNX validation 2-45 s, each MLX validation 1-2 minutes). The
first run on a checkpoint adds our calibration (about 2 minutes for tiny-e2b) and, for the target_bpw rows, the
sensitivity measurement (about 8 minutes for tiny-e2b, 12 for tiny-26b-a4b); both are cached under
$GEMMA4_EXPORT_CACHE.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma4_export import api  # noqa: E402
from gemma4_export.exporter.variants import TINY, get_variant  # noqa: E402

GGUF_PRESETS = ("q4_k_m", "q3_k_m", "q4_k_s", "iq4_xs", "q2_k")
CALIBRATED_ONLY = ("q2_k",)  # ours refuses --no-calibrate; llama.cpp's Q2_K only with its imatrix
TARGET_BPW_PRESETS = ("q4_k_m", "q3_k_m", "q4_k_s", "iq4_xs", "q2_k")
MLX_RECIPES = {"4bit": ["--q-bits", "4"], "4bit_g32": ["--q-bits", "4", "--q-group-size", "32"],
               "5bit": ["--q-bits", "5"], "mixed_4_6": ["--quant-predicate", "mixed_4_6"],
               "mixed_3_6": ["--quant-predicate", "mixed_3_6"]}
# a float32 checkpoint: mlx-lm keeps float32 scales unless told otherwise, so its 4bit_g32 is as large as its 5bit;
# these are the same recipes with bf16 scales (and bf16 unquantized weights), as a user after a small model asks
MLX_BF16_RECIPES = {f"{k} --dtype bfloat16": MLX_RECIPES[k] + ["--dtype", "bfloat16"] for k in ("4bit_g32", "5bit")}
MLX_ALL_RECIPES = {**MLX_RECIPES, **MLX_BF16_RECIPES}
SAME_SIZE = 0.03
CHUNK, CHUNKS = 1024, 16
COLORS = {"gemma4-export": "#1f77b4", "gemma4-export --no-calibrate": "#aec7e8", "llama.cpp": "#ffbb78",
          "llama.cpp + imatrix": "#ff7f0e", "mlx_lm.convert": "#d62728", "onnxruntime RTN": "#2ca02c",
          "onnxruntime HQQ": "#98df8a", "onnxruntime k-quant": "#17becf", "onnxruntime GPTQ": "#9467bd"}


@dataclass
class Row:
    variant: str
    group: str  # rows compared with each other; one is the baseline
    label: str
    tool: str  # who made the artifact (the plot's series)
    tag: str = ""  # its point's label in the plot (the preset or recipe; the series tells who made it)
    baseline: bool = False
    path: str = ""
    bytes: int = 0
    bpw: float | None = None
    kld: float | None = None
    top1: float | None = None
    ppl_ratio: float | None = None
    exact: float | None = None
    tokenizer_mismatches: int | None = None
    passed: bool | None = None  # ours only: validate_artifact's verdict against the preset's thresholds
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    kld_vs_baseline: float | None = None
    size_vs_baseline: float | None = None


def log(msg: str) -> None:
    print(msg, flush=True)


class Step:
    """Times a step and prints it: `with Step("tiny-e2b", "reference") as s: ...`; s.seconds afterwards."""

    def __init__(self, variant: str, what: str):
        self.variant, self.what, self.seconds = variant, what, 0.0

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, et, e, tb):
        self.seconds = time.perf_counter() - self.t0
        log(f"[{self.variant}] {self.what}: {self.seconds:.1f} s" + (f"  FAILED: {_short(e)}" if e else ""))
        return False


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


def run(cmd: list, log_file: Path, env: dict | None = None) -> None:
    """A tool's command, its output to log_file; raises with the log's tail when it fails."""
    with open(log_file, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{Path(cmd[0]).name if cmd[0] != sys.executable else cmd[1]} exited {r.returncode}: "
                           + " | ".join(tail))


def patched_copy(src: Path, dst: Path, edit) -> Path:
    """dst: every file of the checkpoint src symlinked, config.json rewritten by edit(config)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def mlx_lm_keeps_float32(ck: Path) -> bool:
    """Whether `mlx_lm convert` without --dtype keeps float32 (it reads config.json's torch_dtype, then text_config's
    dtype): so it does for tiny-e2b-ft."""
    c = json.loads((Path(ck) / "config.json").read_text())
    return (c.get("torch_dtype") or (c.get("text_config") or {}).get("dtype")) == "float32"


def mlx_lm_config(c: dict) -> None:
    """What mlx-lm's gemma4 ModelArgs needs said: its defaults are E2B's (a top-level vocab_size of 262,144 taken over
    text_config's; per-layer inputs of width 256), where transformers and gemma4-export read an absent
    hidden_size_per_layer_input as no per-layer inputs (tiny-12b's config omits it)."""
    t = c["text_config"]
    c["vocab_size"] = t["vocab_size"]
    t.setdefault("hidden_size_per_layer_input", 0)
    if t.get("global_head_dim") is None:  # a re-saved config gives it per layer, which mlx-lm does not read
        over = [o for o in (t.get("per_layer_config") or {}).values() if isinstance(o, dict)]
        t["global_head_dim"] = next((o["head_dim"] for o in over if "head_dim" in o), t["head_dim"])
        kv = next((o["num_key_value_heads"] for o in over if o.get("num_key_value_heads") is not None), None)
        if kv is not None:
            t.setdefault("num_global_key_value_heads", kv)


# ---- measuring ---------------------------------------------------------------------------------------------------


def measure(row: Row, path: Path, variant: str, ref, params: int, ours: bool, mlx_accumulate: str = "native") -> Row:
    """Run the artifact in its runtime against the reference; fills the row's metrics. An MLX artifact runs with
    `mlx_accumulate` (validate/mlxrt.py)."""
    from gemma4_export.progress import Silent
    from gemma4_export.quant.plan import bits_per_weight
    from gemma4_export.targets.registry import detect_target
    from gemma4_export.validate.harness import EvalSpec, run_validation, validate_artifact

    row.path, row.bytes = str(path), api.artifact_bytes(path)
    row.bpw = bits_per_weight(row.bytes, params)
    t0 = time.perf_counter()
    tgt = detect_target(path)
    opts = {"accumulate": mlx_accumulate} if tgt.name == "mlx" and mlx_accumulate != "native" else {}
    if ours:
        rep = validate_artifact(path, variant, reference=ref, write=False, **opts)
        lm, gm, tok, row.passed = rep.logits, rep.generation, rep.tokenizer, rep.passed
    else:  # no gemma4-export provenance: the target's runner, the same comparison
        runner = tgt.make_runner(path, EvalSpec(**ref.spec), "cpu", tgt.default_preset, **opts)
        try:
            lm, gm, tok, _ = run_validation(runner, ref, Silent())
        finally:
            if hasattr(runner, "close"):
                runner.close()
    row.seconds["validate"] = time.perf_counter() - t0
    row.kld, row.top1, row.ppl_ratio = lm.kld_mean, lm.top1_agreement, lm.ppl_ratio
    row.exact = gm.exact_match_rate
    row.tokenizer_mismatches = len(tok["mismatches"]) if tok else None
    return row


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a, self.rows, self.skipped = a, [], {}
        self.reuse = {(r.variant, r.group, r.label): r for r in _rows_of(a.reuse, a.mlx_accumulate)}
        self.work = Path(a.work or Path(a.out) / "work")
        self.llama = self._llama_tools()
        self.target_bpw = "max_size" in inspect.signature(api.export).parameters
        if not self.target_bpw:
            self.skipped["ours at llama.cpp's size"] = "api.export takes no max_size keyword"

    def _llama_tools(self) -> dict | None:
        a = self.a
        if not a.llama_cpp or not a.llama_bin:
            self.skipped["llama.cpp"] = "no --llama-cpp and --llama-bin given"
            return None
        tree, bins = Path(a.llama_cpp), Path(a.llama_bin)
        need = [tree / "convert_hf_to_gguf.py", tree / "gguf-py"] + \
            [bins / n for n in ("llama-imatrix", "llama-quantize")]
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            self.skipped["llama.cpp"] = f"missing {', '.join(missing)}"
            return None
        return {"tree": tree, "bin": bins}

    def add(self, variant, group, label, tool, make, ref, params, ours, baseline=False, tag=None) -> Row:
        """Make an artifact (make() -> path, or an ExportResult) and measure it; a failure is a row with its error.
        A row `--reuse` holds that gemma4-export's calibrated quantizers do not make is taken from there."""
        old = self.reuse.get((variant, group, label))
        if old is not None and tool != "gemma4-export":
            old.seconds = {**old.seconds, "reused": 1.0}
            self.rows.append(old)
            log(f"[{variant}]   {label}: reused, mean KLD {old.kld:.3g}")
            return old
        row = Row(variant, group, label, tool, tag or group.split()[-1], baseline)
        self.rows.append(row)
        try:
            with Step(variant, f"{label}: make") as s:
                made = make()
            row.seconds["make"] = s.seconds
            with Step(variant, f"{label}: validate") as s:
                measure(row, Path(getattr(made, "path", made)), variant, ref, params, ours, self.a.mlx_accumulate)
            log(f"[{variant}]   {label}: {row.bytes / 1e6:.3f} MB, {row.bpw:.3f} bpw, mean KLD {row.kld:.3g}, "
                f"top-1 {row.top1:.4f}, PPL ratio {row.ppl_ratio:.4f}")
        except Exception as e:  # one failed artifact does not stop the benchmark
            row.error = _short(e)
            if self.a.verbose:
                traceback.print_exc()
        return row

    def ours(self, target, variant, preset, sub, calibrate=None, **kw):
        out = self.work / variant / "ours" / sub
        # text only: the reference tools' artifacts have no towers, and equal size means equal text
        return lambda: api.export(target, variant, preset, out, force=True, calibrate=calibrate, towers=False, **kw)

    # ---- per variant ---------------------------------------------------------------------------------------------
    def variant(self, v: str) -> None:
        ck = get_variant(v).local_dir
        if ck is None or not ck.is_dir():
            self.skipped[v] = "no local checkpoint (tiny variants only)"
            return
        with Step(v, "fp32 reference (held-out text)"):
            ref = api.reference(v)
        params = int(ref.meta["text_parameters"])
        only = self.a.only
        if "gguf" in only:
            self.gguf(v, ck, ref, params)
        if "mlx" in only:
            self.mlx(v, ck, ref, params)
        if "onnx" in only:
            g = "onnx int4"
            self.add(v, g, "ours int4", "gemma4-export", self.ours("onnx", v, "int4", "onnx-int4"), ref, params, True)
            rtn = self.add(v, g, "onnxruntime int4 RTN (ours --no-calibrate)", "onnxruntime RTN",
                           self.ours("onnx", v, "int4", "onnx-int4-rtn", calibrate=False), ref, params, True,
                           baseline=True)
            self.onnxruntime_quantizers(v, ref, params, rtn)

    def onnxruntime_quantizers(self, v, ref, params, rtn: Row) -> None:
        """onnxruntime's own HQQ, k-quant and GPTQ on the round-to-nearest artifact's graph, from our fp32 export's
        weights (scripts/bench_ort.py); GPTQ calibrated on the tokens ours is."""
        from bench_ort import quantize_with_onnxruntime

        if rtn.error or not rtn.path:
            self.skipped[f"{v}: onnxruntime HQQ, k-quant, GPTQ"] = "no round-to-nearest artifact to start from"
            return
        made: dict[str, Path] = {}

        def fp32() -> Path:
            if "fp32" not in made:
                with Step(v, "ours onnx fp32: the float weights for onnxruntime's quantizers"):
                    made["fp32"] = Path(self.ours("onnx", v, "fp32", "onnx-fp32")().path)
            return made["fp32"]

        def chunks() -> list[list[int]]:
            from gemma4_export.quant.calibrate import calibration_set

            src = api.open_source(variant=v)
            return calibration_set(src.checkpoint.dir, src.arch.bos_token_id).chunks

        for algo, label in (("hqq", "HQQ"), ("k_quant", "k-quant"), ("gptq", "GPTQ")):
            out = self.work / v / "onnxruntime" / algo / Path(rtn.path).name
            self.add(v, "onnx int4", f"onnxruntime int4 {label}" + (" (blocks of 64)" if algo == "hqq" else ""),
                     f"onnxruntime {label}",
                     lambda algo=algo, out=out: quantize_with_onnxruntime(
                         algo, Path(rtn.path), fp32(), out, chunks() if algo == "gptq" else None),
                     ref, params, False)

    def gguf(self, v, ck, ref, params) -> None:
        w = self.work / v / "llama.cpp"
        base = imat = None
        if self.llama:
            w.mkdir(parents=True, exist_ok=True)
            tree, bins = self.llama["tree"], self.llama["bin"]
            try:
                with Step(v, "llama.cpp: convert_hf_to_gguf.py --outtype bf16"):
                    hf = patched_copy(ck, w / "hf", lambda c: c["text_config"].setdefault("moe_intermediate_size",
                                                                                          None))
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                        [str(tree / "gguf-py")] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
                    base = w / f"{v}-bf16.gguf"
                    run([sys.executable, tree / "convert_hf_to_gguf.py", hf, "--outtype", "bf16", "--outfile", base],
                        w / "convert.log", env)
                with Step(v, f"llama.cpp: llama-imatrix -c {CHUNK} --chunks {CHUNKS} on our calibration text"):
                    import transformers

                    from gemma4_export.quant.calibrate import shipped_text

                    text = w / "calibration.txt"
                    text.write_text(shipped_text(transformers.AutoTokenizer.from_pretrained(ck)), encoding="utf-8")
                    imat = w / "imatrix.gguf"
                    run([bins / "llama-imatrix", "-m", base, "-f", text, "-c", CHUNK, "--chunks", CHUNKS, "-o", imat],
                        w / "imatrix.log")
            except Exception as e:
                self.skipped[f"{v} llama.cpp"] = _short(e)
                base = None if not (base and base.is_file()) else base
                imat = None

        def quantize(ftype: str, name: str, with_imat: bool):
            def make():
                out = w / name
                run([self.llama["bin"] / "llama-quantize"] + (["--imatrix", imat] if with_imat else [])
                    + [base, out, ftype.upper()], w / f"{name}.log")
                return out
            return make

        g = "gguf bf16"
        self.add(v, g, "ours bf16", "gemma4-export", self.ours("gguf", v, "bf16", "gguf-bf16"), ref, params, True)
        if base:
            self.add(v, g, "llama.cpp bf16 (convert_hf_to_gguf)", "llama.cpp", lambda: base, ref, params, False,
                     baseline=True)
        for p in self.a.gguf_presets:
            g = f"gguf {p}"
            self.add(v, g, f"ours {p}", "gemma4-export", self.ours("gguf", v, p, f"gguf-{p}"), ref, params, True)
            if p not in CALIBRATED_ONLY:
                self.add(v, g, f"ours {p} --no-calibrate", "gemma4-export --no-calibrate",
                         self.ours("gguf", v, p, f"gguf-{p}-plain", calibrate=False), ref, params, True)
            if base and p not in CALIBRATED_ONLY:
                self.add(v, g, f"llama.cpp {p}", "llama.cpp", quantize(p, f"{v}-{p}.gguf", False), ref, params, False)
            if base and imat:
                b = self.add(v, g, f"llama.cpp {p} + imatrix", "llama.cpp + imatrix",
                             quantize(p, f"{v}-{p}-imatrix.gguf", True), ref, params, False, baseline=True)
                if self.target_bpw and p in TARGET_BPW_PRESETS and b.bytes:
                    self.add(v, g, f"ours {p} at llama.cpp's size (--max-size {b.bytes})", "gemma4-export",
                             self.ours("gguf", v, p, f"gguf-{p}-bpw", max_size=b.bytes), ref, params, True,
                             tag=f"{p} sized")

    def mlx(self, v, ck, ref, params) -> None:
        g4, gm = "mlx 4bit", "mlx mixed"
        self.add(v, g4, "ours 4bit", "gemma4-export", self.ours("mlx", v, "4bit", "mlx-4bit"), ref, params, True)
        self.add(v, g4, "ours 4bit --no-calibrate", "gemma4-export --no-calibrate",
                 self.ours("mlx", v, "4bit", "mlx-4bit-plain", calibrate=False), ref, params, True)
        self.add(v, gm, "ours mixed", "gemma4-export", self.ours("mlx", v, "mixed", "mlx-mixed"), ref, params, True)
        if importlib.util.find_spec("mlx_lm") is None:
            self.skipped[f"{v} mlx_lm.convert"] = "mlx-lm is not installed"
            return
        w = self.work / v / "mlx_lm"
        hf = patched_copy(ck, w / "hf", mlx_lm_config)

        def convert(recipe: str):
            def make():
                slug = recipe.replace(" --dtype ", "_")
                out = w / slug
                shutil.rmtree(out, ignore_errors=True)
                run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", hf, "--mlx-path", out, "-q",
                     "--q-group-size", "64"] + MLX_ALL_RECIPES[recipe], w / f"{slug}.log")
                return out
            return make

        recipes = [("4bit", g4), ("4bit_g32", g4), ("5bit", g4), ("mixed_4_6", gm), ("mixed_3_6", gm)]
        if mlx_lm_keeps_float32(ck):
            recipes += [(k, g4) for k in MLX_BF16_RECIPES]
        for recipe, group in recipes:
            r = self.add(v, group, f"mlx_lm.convert {recipe}", "mlx_lm.convert", convert(recipe), ref, params, False,
                         baseline=recipe in ("4bit", "mixed_4_6"), tag=recipe)
            if recipe.startswith("5bit") and self.target_bpw and r.bytes:  # ours at that size, its types measured
                bf16 = recipe != "5bit"
                self.add(v, g4, f"ours at mlx-lm {recipe}'s size (--max-size {r.bytes})", "gemma4-export",
                         self.ours("mlx", v, "4bit", "mlx-4bit-sized" + "-bf16" * bf16, max_size=r.bytes), ref,
                         params, True, tag="4bit sized" + " bf16" * bf16)

    # ---- results -------------------------------------------------------------------------------------------------
    def compare(self) -> None:
        for r in self.rows:
            b = next((x for x in self.rows if x.variant == r.variant and x.group == r.group and x.baseline), None)
            if b is None or r.kld is None or b.kld is None or not b.bytes:
                continue
            r.kld_vs_baseline = r.kld / b.kld if b.kld > 0 else None
            r.size_vs_baseline = r.bytes / b.bytes - 1

    def table(self) -> str:
        f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
        out = ["| variant | group | artifact | size MB | bpw | mean KLD | top-1 | PPL ratio | greedy exact | "
               "KLD / baseline | size vs baseline |", "|" + "---|" * 11]
        first = {}
        for i, r in enumerate(self.rows):
            first.setdefault((r.variant, r.group), i)
        for r in sorted(self.rows, key=lambda r: first[r.variant, r.group]):  # a group's rows together
            if r.error:
                out.append(f"| {r.variant} | {r.group} | {r.label} | failed: {r.error} |" + " |" * 7)
                continue
            size = "baseline" if r.baseline else "-" if r.size_vs_baseline is None else (
                f"{r.size_vs_baseline:+.1%}" + (" **not equal**" if abs(r.size_vs_baseline) > SAME_SIZE else ""))
            ratio = "1 (baseline)" if r.baseline else f(r.kld_vs_baseline, ".2f")
            out.append(f"| {r.variant} | {r.group} | {r.label} | {r.bytes / 1e6:.3f} | {f(r.bpw, '.3f')} | "
                       f"{f(r.kld, '.3g')} | {f(r.top1, '.4f')} | {f(r.ppl_ratio, '.4f')} | {f(r.exact, '.3f')} | "
                       f"{ratio} | {size} |")
        return "\n".join(out)

    def svg(self) -> str:
        """One panel per variant, stacked in one document; the bf16 pair, a check of the conversion, is left out (it
        would stretch the size axis)."""
        panels = []
        for i, v in enumerate(dict.fromkeys(r.variant for r in self.rows)):
            pts = [(r.tool, r.tag, r.bytes / 1e6, r.kld) for r in self.rows
                   if r.variant == v and r.kld is not None and r.group != "gguf bf16"]
            panels.append(panel(pts, f"{v}: mean KLD against artifact size (lower left is better)", i * PH))
        n = max(1, len(panels))
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{PW}" height="{n * PH}" font-family="sans-serif" '
                f'font-size="12">\n<rect width="{PW}" height="{n * PH}" fill="white"/>\n' + "\n".join(panels)
                + "\n</svg>\n")


PW, PH = 900, 500  # one panel; the margins, label placement and point marks are svgplot's


def panel(pts: list[tuple[str, str, float, float]], title: str, y0: float) -> str:
    """svgplot's KLD (log) against size plot, but with the size axis spanning the points' range rather than from 0:
    the artifacts compared here are all within a factor of two in size. pts: (series, label, MB, KLD)."""
    import math

    from gemma4_export.validate import svgplot as sp

    out = [f'<g transform="translate(0,{y0:.0f})">',
           f'<text x="{PW / 2:.0f}" y="24" text-anchor="middle" font-size="15">{title}</text>']
    if not pts:
        return "\n".join(out + ['<text x="100" y="100">nothing measured</text></g>'])
    pw, ph = PW - sp.LEFT - 220, PH - sp.TOP - sp.BOTTOM
    mbs = [p[2] for p in pts]
    step = sp.nice_ticks(max(mbs) - min(mbs) or 1, 5)[1]
    lo, hi = math.floor(min(mbs) / step - 0.5) * step, math.ceil(max(mbs) / step + 0.5) * step
    dlo, dhi = sp.decades([max(p[3], sp.KLD_FLOOR) for p in pts])
    x_of = lambda mb: sp.LEFT + pw * (mb - lo) / (hi - lo)  # noqa: E731
    y_of = lambda k: sp.TOP + ph * (dhi - math.log10(max(k, sp.KLD_FLOOR))) / (dhi - dlo)  # noqa: E731
    out.append(f'<rect x="{sp.LEFT}" y="{sp.TOP}" width="{pw}" height="{ph}" stroke="#333" fill="none"/>')
    for i in range(round((hi - lo) / step) + 1):
        x = x_of(lo + i * step)
        out.append(f'<line x1="{x:.1f}" y1="{sp.TOP}" x2="{x:.1f}" y2="{sp.TOP + ph}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{sp.TOP + ph + 18}" text-anchor="middle">{lo + i * step:g}</text>')
    for d in range(dlo, dhi + 1):
        y = y_of(10.0 ** d)
        out.append(f'<line x1="{sp.LEFT}" y1="{y:.1f}" x2="{sp.LEFT + pw}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{sp.LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">1e{d}</text>')
    out.append(f'<text x="{sp.LEFT + pw / 2:.0f}" y="{PH - 15}" text-anchor="middle">artifact size (MB)</text>'
               f'<text transform="translate(20,{sp.TOP + ph / 2:.0f}) rotate(-90)" text-anchor="middle">'
               'mean KLD (log scale)</text>')
    order = list(dict.fromkeys(p[0] for p in pts))
    placed: list = []
    for s, label, mb, kld in pts:
        c = sp.color_of(s, order, COLORS)
        x, y = x_of(mb), y_of(kld)
        out.append(f'<g fill="{c}">' + sp._point(sp.Point(s, label, mb, kld), x, y, c, kld <= sp.KLD_FLOOR,
                                                   sp.KLD_FLOOR, sp._place(label, x, y, placed)) + "</g>")
    out.append(sp._legend(order, sp.LEFT + pw + 20, sp.TOP + 10, COLORS))
    return "\n".join(out + ["</g>"])


def versions() -> dict:
    out = {}
    for m in ("llama_cpp", "mlx_lm", "mlx", "onnxruntime", "transformers", "torch"):
        try:
            out[m] = __import__(m).__version__
        except Exception:
            out[m] = None
    return out


def _rows_of(files, mlx_accumulate: str) -> list[Row]:
    """The rows of earlier runs' JSON files, less the failed ones and the MLX rows measured with other sums (a file
    that does not say measured them natively)."""
    out = []
    for f in files:
        d = json.loads(Path(f).read_text())
        same = d.get("mlx_accumulate", "native") == mlx_accumulate
        out += [Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__}) for r in d["rows"]
                if not r.get("error") and (same or not r["group"].startswith("mlx"))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=list(TINY), help="(none: only --merge)")
    ap.add_argument("--only", default="gguf,mlx,onnx", help="comma-separated targets: gguf,mlx,onnx")
    ap.add_argument("--gguf-presets", nargs="+", default=list(GGUF_PRESETS), choices=GGUF_PRESETS)
    ap.add_argument("--out", default="bench-quality", help="where bench_quality.json and .svg go")
    ap.add_argument("--work", help="where the artifacts go (default: OUT/work)")
    ap.add_argument("--llama-cpp", help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--llama-bin", help="directory with llama-imatrix and llama-quantize")
    ap.add_argument("--mlx-accumulate", choices=("float32", "native"), default="float32",
                    help="how mlx sums the MLX rows' quantized matmuls on the CPU: float32, as its Metal kernels do "
                         "(the default), or native, its CPU kernels' bfloat16 sums (validate/mlxrt.py)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    ap.add_argument("--merge", nargs="+", type=Path, default=[], metavar="JSON",
                    help="rows of earlier runs' bench_quality.json to report with this run's (a row measured again "
                         "here or in a later file, or failed there, is left out)")
    ap.add_argument("--reuse", nargs="+", type=Path, default=[], metavar="JSON",
                    help="take the rows that do not depend on gemma4-export's calibrated quantizers (the reference "
                         "tools' artifacts, ours --no-calibrate) from earlier runs' bench_quality.json instead of "
                         "making them again (after a change to calibration alone)")
    a = ap.parse_args()
    a.only = {t.strip() for t in a.only.split(",") if t.strip()}
    if a.only - {"gguf", "mlx", "onnx"}:
        ap.error(f"--only: unknown {', '.join(sorted(a.only - {'gguf', 'mlx', 'onnx'}))}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(a)
    for k, why in b.skipped.items():
        log(f"skipping {k}: {why}")
    t0 = time.perf_counter()

    # a later file's row wins
    merged = list({(r.variant, r.group, r.label): r for r in _rows_of(a.merge, a.mlx_accumulate)}.values())

    run_rows = b.rows  # what this run measures (Bench.add appends here)

    def save(final: bool) -> None:  # after every variant, so that a run cut short leaves what it measured
        mine = {(r.variant, r.group, r.label) for r in run_rows}
        b.rows = [r for r in merged if (r.variant, r.group, r.label) not in mine] + run_rows
        b.compare()
        (out / "bench_quality.json").write_text(json.dumps(
            {"rows": [asdict(r) for r in b.rows], "skipped": b.skipped, "seconds": time.perf_counter() - t0,
             "complete": final, "versions": versions(), "same_size_within": SAME_SIZE,
             "calibration": {"chunk": CHUNK, "chunks": CHUNKS}, "target_bpw": b.target_bpw,
             "mlx_accumulate": a.mlx_accumulate}, indent=2) + "\n")
        (out / "bench_quality.svg").write_text(b.svg())
        if not final:
            b.rows = run_rows

    for v in a.variants:
        tv = time.perf_counter()
        try:
            b.variant(v)
        except Exception as e:
            b.skipped[v] = _short(e)
            log(f"[{v}] failed: {_short(e)}")
        log(f"[{v}] done in {time.perf_counter() - tv:.0f} s")
        save(False)
    save(True)
    log("\n" + b.table() + "\n")
    if b.skipped:
        log("Skipped: " + "; ".join(f"{k}: {v}" for k, v in b.skipped.items()))
    log(f"Total {time.perf_counter() - t0:.0f} s; wrote {out / 'bench_quality.json'} and {out / 'bench_quality.svg'}")


if __name__ == "__main__":
    main()
