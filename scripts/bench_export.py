"""Benchmark: export speed and peak memory on a synthetic checkpoint with E2B's real widths.

    python scripts/bench_export.py [--targets gguf,onnx,mlx] [--layers 6] [--work /tmp/gemma4-bench] [--keep]
                                   [--llama-cpp TREE --llama-bin DIR] [--calibrate]

Builds (once) a bf16 checkpoint with E2B's hidden size 1536, vocabulary 262144, per-layer embeddings of 256 per
layer, intermediate 6144, 8 heads of 256 (512 on full layers) and a few layers (about 2 GB), then times, each in a
fresh process that reports its own peak resident memory:
  - a plain copy of the checkpoint file (the floor for any conversion),
  - per target, a 16-bit and a 4-bit export with --no-validate (and --no-calibrate: the export alone): gguf bf16 and
    q4_k_m, onnx fp16 and int4, mlx bf16 and 4bit;
  - with --calibrate, `gemma4-export imatrix` on the checkpoint, then the gguf q4_k_m export with that imatrix;
  - with --llama-cpp (the llama.cpp source tree: convert_hf_to_gguf.py and gguf-py) and --llama-bin (its built
    llama-quantize), llama.cpp's own two steps to the same q4_k_m: convert_hf_to_gguf.py --outtype bf16, then
    llama-quantize Q4_K_M; and the ratio of their total time to ours. Beside it ours with the PLE table at Q6_K,
    llama.cpp's type for it (ours is Q4_K: smaller, and slower to quantize), which is the like-for-like speed pair.
The checkpoint's tokenizer is the tiny one padded to the 262,144-token vocabulary: llama.cpp's converter cuts the token
embedding to the tokenizer's size, and a short tokenizer would let it skip most of it.
Not a test: it prints numbers, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
S, F = "sliding_attention", "full_attention"

# A child process that runs one job and prints its peak RSS (ru_maxrss, KiB on Linux) as the last line.
_CHILD = """
import resource, sys, runpy
sys.argv = {argv!r}
try:
    {body}
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def make_checkpoint(d: Path, layers: int) -> Path:
    from safetensors.numpy import save_file

    if (d / "model.safetensors").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    h, v, ple, inter = 1536, 262144, 256, 6144
    types = ([S] * 4 + [F]) * (layers // 5) + [S] * (layers % 5)
    types[-1] = F
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    def bf16(a):
        return (a.view(np.uint32) >> 16).astype(np.uint16)

    p = "model.language_model."
    t = {f"{p}embed_tokens.weight": w(v, h), f"{p}embed_tokens_per_layer.weight": w(v, layers * ple),
         f"{p}per_layer_model_projection.weight": w(layers * ple, h),
         f"{p}per_layer_projection_norm.weight": np.ones(ple, np.float32), f"{p}norm.weight": np.ones(h, np.float32)}
    for i, lt in enumerate(types):
        hd = 512 if lt == F else 256
        lp = f"{p}layers.{i}."
        t.update({
            f"{lp}input_layernorm.weight": np.ones(h, np.float32),
            f"{lp}post_attention_layernorm.weight": np.ones(h, np.float32),
            f"{lp}pre_feedforward_layernorm.weight": np.ones(h, np.float32),
            f"{lp}post_feedforward_layernorm.weight": np.ones(h, np.float32),
            f"{lp}self_attn.q_proj.weight": w(8 * hd, h), f"{lp}self_attn.k_proj.weight": w(hd, h),
            f"{lp}self_attn.v_proj.weight": w(hd, h), f"{lp}self_attn.o_proj.weight": w(h, 8 * hd),
            f"{lp}self_attn.q_norm.weight": np.ones(hd, np.float32),
            f"{lp}self_attn.k_norm.weight": np.ones(hd, np.float32),
            f"{lp}mlp.gate_proj.weight": w(inter, h), f"{lp}mlp.up_proj.weight": w(inter, h),
            f"{lp}mlp.down_proj.weight": w(h, inter),
            f"{lp}per_layer_input_gate.weight": w(ple, h), f"{lp}per_layer_projection.weight": w(h, ple),
            f"{lp}post_per_layer_input_norm.weight": np.ones(h, np.float32),
            f"{lp}layer_scalar": np.ones(1, np.float32),
        })
    # safetensors.numpy has no bfloat16: write uint16 bit patterns, then relabel the dtype in the header.
    arrays = {k: bf16(a) for k, a in t.items()}
    del t
    tmp = d / "model.tmp"
    save_file(arrays, str(tmp))
    raw = tmp.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    for k, meta in header.items():
        if k != "__metadata__":
            meta["dtype"] = "BF16"
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb)
        f.write(memoryview(raw)[8 + n :])
    tmp.unlink()
    cfg = json.loads((ROOT / "gemma4_export/exporter/configs/e2b.json").read_text())
    tc = cfg["text_config"]
    tc.update(num_hidden_layers=layers, layer_types=types, num_kv_shared_layers=0, use_double_wide_mlp=False)
    cfg.pop("vision_config", None)
    cfg.pop("audio_config", None)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    tiny = ROOT / "gemma4_export/tiny/checkpoints/tiny-e2b"
    for f in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(tiny / f, d / f)
    # The tiny tokenizer padded to the real vocabulary, as Gemma's own has hundreds of unused tokens: llama.cpp's
    # converter cuts token_embd to the tokenizer's size, so a short tokenizer would make it skip most of the embedding
    # and the comparison would not be like for like.
    tok = json.loads((tiny / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    taken = set(vocab.values()) | {a["id"] for a in tok.get("added_tokens", [])}
    vocab.update({f"<bench_unused{i}>": i for i in range(v) if i not in taken})
    (d / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return d


JOBS = {"gguf": ("bf16", "q4_k_m"), "onnx": ("fp16", "int4"), "mlx": ("bf16", "4bit")}


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# A child that runs an external command and prints the peak RSS of its largest child (RUSAGE_CHILDREN).
_EXTERNAL = """
import resource, subprocess, sys
r = subprocess.run({cmd!r}, env={env!r}, capture_output=True)
if r.returncode:
    sys.stderr.write(r.stderr[-3000:].decode("utf-8", "replace"))
    raise SystemExit(r.returncode)
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
"""


def run_external(label: str, cmd: list[str], env: dict | None = None) -> dict:
    return run(label, None, [], code=_EXTERNAL.format(cmd=cmd, env=env if env is not None else dict(os.environ)))


def run(label: str, body: str | None, argv: list[str], code: str | None = None) -> dict:
    code = code or _CHILD.format(argv=argv, body=body)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{label} failed:\n{r.stderr[-3000:]}")
    peak = int(r.stdout.strip().splitlines()[-1].split()[1]) * 1024
    return {"job": label, "seconds": round(secs, 2), "peak_rss_mb": round(peak / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="gguf", help="comma-separated: gguf, onnx, mlx")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gemma4-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--calibrate", action="store_true", help="also time the imatrix and a calibrated gguf q4_k_m")
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--llama-bin", type=Path, help="directory with llama.cpp's built llama-quantize")
    a = ap.parse_args()
    if a.make:
        make_checkpoint(a.make, a.layers)
        return
    ck = a.work / "checkpoint"
    if not (ck / "model.safetensors").is_file():
        # In a child: a forked process inherits its parent's peak RSS, so the big arrays must not live here.
        subprocess.run([sys.executable, __file__, "--make", str(ck), "--layers", str(a.layers)], check=True)
    size = (ck / "model.safetensors").stat().st_size
    out = a.work / "out"
    out.mkdir(exist_ok=True)
    rows = [run("plain copy", "import shutil; shutil.copyfile(sys.argv[1], sys.argv[2])",
                ["copy", str(ck / "model.safetensors"), str(out / "copy.safetensors")])]
    (out / "copy.safetensors").unlink()
    cli = "runpy.run_module('gemma4_export.cli', run_name='__main__')"
    for target in a.targets.split(","):
        for q in JOBS[target]:
            job_out = out / f"{target}-{q}"
            rows.append(run(f"gemma4-export {target} {q}", cli, ["gemma4-export", target, "--model-dir", str(ck),
                                                                 "--quant", q, "--out", str(job_out),
                                                                 "--no-validate", "--force", "--no-calibrate"]))
            rows[-1]["output_mb"] = round(_size(job_out) / 1e6)
            shutil.rmtree(job_out)
    if a.calibrate:
        imat = out / "imatrix.gguf"
        rows.append(run("gemma4-export imatrix", cli, ["gemma4-export", "imatrix", "--model-dir", str(ck), "--out",
                                                       str(imat), "--force"]))
        job_out = out / "gguf-q4_k_m-imatrix"
        rows.append(run("gemma4-export gguf q4_k_m +imatrix", cli,
                        ["gemma4-export", "gguf", "--model-dir", str(ck), "--quant", "q4_k_m", "--out", str(job_out),
                         "--no-validate", "--force", "--imatrix", str(imat)]))
        rows[-1]["output_mb"] = round(_size(job_out) / 1e6)
        shutil.rmtree(job_out)
    if a.llama_cpp and a.llama_bin:
        # llama.cpp's Q4_K_M puts both lookup tables (token_embd, per_layer_token_embd) at Q6_K; ours puts the PLE
        # table at Q4_K, which is smaller but costs more CPU (ggml's Q4_K search is slower than Q6_K's). The same
        # export with the PLE table at Q6_K is the like-for-like speed comparison.
        job_out = out / "gguf-q4_k_m-ple-q6_k"
        rows.append(run("gemma4-export gguf q4_k_m, PLE Q6_K", cli,
                        ["gemma4-export", "gguf", "--model-dir", str(ck), "--quant", "q4_k_m", "--ple-type", "Q6_K",
                         "--out", str(job_out), "--no-validate", "--force", "--no-calibrate"]))
        rows[-1]["output_mb"] = round(_size(job_out) / 1e6)
        shutil.rmtree(job_out)
        env = dict(os.environ, PYTHONPATH=str(a.llama_cpp / "gguf-py"))
        bf16 = out / "llama-bf16.gguf"
        rows.append(run_external("llama.cpp convert bf16", [sys.executable, str(a.llama_cpp / "convert_hf_to_gguf.py"),
                                                            str(ck), "--outtype", "bf16", "--outfile", str(bf16)], env))
        rows[-1]["output_mb"] = round(_size(bf16) / 1e6)
        q4 = out / "llama-q4_k_m.gguf"
        rows.append(run_external("llama.cpp quantize q4_k_m", [str(a.llama_bin / "llama-quantize"), str(bf16), str(q4),
                                                               "Q4_K_M", str(os.cpu_count())]))
        rows[-1]["output_mb"] = round(_size(q4) / 1e6)
        bf16.unlink()
        q4.unlink()
    print(f"checkpoint: {size / 1e9:.2f} GB bf16, {a.layers} layers, E2B widths; {os.cpu_count()} cores")
    print(f"{'job':36s} {'seconds':>8s} {'peak RSS MB':>12s} {'output MB':>10s}")
    for r in rows:
        print(f"{r['job']:36s} {r['seconds']:8.2f} {r['peak_rss_mb']:12d} {r.get('output_mb', ''):>10}")
    base = rows[0]["seconds"]
    for r in rows[1:]:
        print(f"{r['job']} / plain copy: {r['seconds'] / base:.2f}x")
    by = {r["job"]: r for r in rows}
    if "llama.cpp quantize q4_k_m" in by:
        theirs = by["llama.cpp convert bf16"]["seconds"] + by["llama.cpp quantize q4_k_m"]["seconds"]
        peak = max(by["llama.cpp convert bf16"]["peak_rss_mb"], by["llama.cpp quantize q4_k_m"]["peak_rss_mb"])
        for job in ("gemma4-export gguf q4_k_m", "gemma4-export gguf q4_k_m, PLE Q6_K"):
            if ours := by.get(job):
                print(f"{job}: {ours['seconds']:.1f} s, {ours['peak_rss_mb']} MB peak; llama.cpp convert + quantize "
                      f"{theirs:.1f} s, {peak} MB peak: {theirs / ours['seconds']:.2f}x faster")
    if not a.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
