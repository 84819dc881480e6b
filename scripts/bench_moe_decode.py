"""Benchmark: ONNX decode speed of a mixture-of-experts model, the current lowering against an earlier revision's.

    python scripts/bench_moe_decode.py [--variant tiny-26b-a4b | --model-dir DIR] [--baseline REV] [--quant int4]
        [--prompt 64] [--new 32] [--threads N] [--work DIR]

For each of: this checkout, and the package as it was at --baseline (extracted with `git archive`, default 371f273,
where the expert block was one dense product over all experts), it exports the checkpoint to ONNX (--no-validate
--no-calibrate) in a fresh process, then, in another fresh process, loads the artifact with that revision's own
onnxruntime runner and times: the session load, one prefill of --prompt tokens, and --new greedy decode steps of one
token each through the KV cache. Prints tokens per second and checks that both produce the same greedy tokens.
Asserts nothing.

`--model-dir` takes any Gemma 4 MoE checkpoint; a few real-width 26B-A4B layers (hidden 2816, 128 experts of 704,
top 8, the 262,144-token vocabulary) are what `scripts/bench_validate.py --variant 26b-a4b --layers 2 --keep DIR`
leaves in DIR/checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_TIME = """
import json, sys, time
import numpy as np
from gemma4_export.validate.onnxrt import ONNXRunner
path, prompt, new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) or None
t0 = time.perf_counter()
r = ONNXRunner(path, threads=threads)
load = time.perf_counter() - t0
ids = [2] + [int(x) for x in np.random.default_rng(0).integers(3, 1000, prompt - 1)]
t0 = time.perf_counter()
logits, cache = r.run(np.array([ids]), np.ones((1, prompt)), np.arange(prompt)[None], r.empty_cache())
prefill = time.perf_counter() - t0
out, total, steps = [int(np.argmax(logits[0, -1]))], prompt, []
for _ in range(new - 1):
    t0 = time.perf_counter()
    logits, cache = r.run(np.array([[out[-1]]]), np.ones((1, total + 1)), np.array([[total]]), cache)
    steps.append(time.perf_counter() - t0)
    out.append(int(np.argmax(logits[0, -1])))
    total += 1
print(json.dumps({"load_s": load, "prefill_s": prefill, "decode_s_per_token": float(np.median(steps)),
                  "tokens": out}))
"""


def _export(code_root: Path, source: list[str], quant: str, out: Path) -> tuple[Path, float]:
    env = dict(os.environ, PYTHONPATH=str(code_root))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "gemma4_export.cli", "onnx", *source, "--quant", quant, "--out",
                        str(out), "--no-validate", "--no-calibrate", "--force"], env=env, capture_output=True,
                       text=True, cwd=code_root)
    if r.returncode:
        raise SystemExit(f"export with {code_root} failed:\n{r.stderr[-3000:]}")
    art = next(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    return art, time.perf_counter() - t0


def _time(code_root: Path, art: Path, prompt: int, new: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_root))
    r = subprocess.run([sys.executable, "-c", _TIME, str(art), str(prompt), str(new), str(threads)], env=env,
                       capture_output=True, text=True, cwd=code_root)
    if r.returncode:
        raise SystemExit(f"timing with {code_root} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--variant", default="tiny-26b-a4b")
    g.add_argument("--model-dir", type=Path)
    ap.add_argument("--baseline", default="371f273", help="git revision with the lowering to compare against")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--work", type=Path, help="where the exports go (default: a temporary directory)")
    a = ap.parse_args()
    source = ["--model-dir", str(a.model_dir)] if a.model_dir else ["--variant", a.variant]
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        work = a.work or Path(tmp)
        base_root = Path(tmp) / "baseline"
        base_root.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.baseline], capture_output=True, check=True)
        arch_path = Path(tmp) / "baseline.tar"
        arch_path.write_bytes(archive.stdout)
        with tarfile.open(arch_path) as tf:
            tf.extractall(base_root, filter="data")
        rows = {}
        for label, code in ((f"baseline {a.baseline}", base_root), ("current", ROOT)):
            art, export_s = _export(code, source, a.quant, work / f"out-{label.split()[0]}")
            rows[label] = {"export_s": export_s, **_time(code, art, a.prompt, a.new, a.threads)}
            print(f"{label}: {json.dumps({k: v for k, v in rows[label].items() if k != 'tokens'})}", flush=True)
    (base, b), (_, c) = rows.items()
    print(f"\n{' '.join(source)}, {a.quant}, prompt {a.prompt}, {a.new} new tokens, {os.cpu_count()} cores")
    print(f"{'':28s} {'load s':>8s} {'prefill s':>10s} {'decode tok/s':>13s}")
    for label, r in rows.items():
        print(f"{label:28s} {r['load_s']:8.2f} {r['prefill_s']:10.3f} {1 / r['decode_s_per_token']:13.2f}")
    print(f"decode: {b['decode_s_per_token'] / c['decode_s_per_token']:.2f}x faster; prefill: "
          f"{b['prefill_s'] / c['prefill_s']:.2f}x; same greedy tokens: {b['tokens'] == c['tokens']}")


if __name__ == "__main__":
    main()
