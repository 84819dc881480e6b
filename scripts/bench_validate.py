"""Benchmark: the stored fp32 reference and validation against it, on a checkpoint with a published config.

    python scripts/bench_validate.py [--variant e2b] [--layers N] [--keep DIR] [--steps ...] [--json FILE]

Builds a checkpoint with the variant's published config (exporter/configs/<variant>.json: every layer, the real
widths, the 262,144-token vocabulary, the towers) and random weights, written by transformers' own save_pretrained in
bfloat16 (E2B: 10.2 GB) with the tokenizer of the shipped tiny-e2b checkpoint. Then it runs, each in a fresh
process whose own peak resident memory (ru_maxrss from wait4) and seconds it records:

  reference  gemma4-export reference --model-dir CKPT --out REF   (the streamed fp32 reference, stored)
  imatrix    gemma4-export imatrix --model-dir CKPT --out OUT/imatrix.gguf   (calibration on the streamed model)
  gguf       gemma4-export gguf --model-dir CKPT --quant q4_k_m --out OUT --no-validate, with --imatrix
             OUT/imatrix.gguf when the imatrix step made it, else --no-calibrate   (the one-pass export)
  validate   gemma4-export validate OUT/<name>.gguf --reference REF --model-dir CKPT   (llama.cpp against the
             stored reference; the projector's embeddings and media-prompted generations against the towers and the
             streamed text model)
  baseline   the whole-model reference (validate.reference.WholeModelReference: the whole multimodal model in fp32)
             computing the logits of the same windows and the greedy continuations of the same prompts; it runs only
             when the checkpoint's parameters x 4 bytes + 2 GB fit in MemAvailable, and is checked against the
             stored reference (top-1 agreement, largest log-probability difference, identical greedy continuations)

and prints a Markdown table (seconds, CPU seconds, peak RSS), the reference's size and meta, the validation's key
numbers, and PASS/FAIL against the memory limits for E2B at full depth (reference under 2.5 GB, validation under 8 GB).

--layers N builds the first N layers only (the last one made a full-attention layer, so both kinds are measured):
`--variant 31b --layers 2 --steps reference` gives what 31B needs per real-width layer. Nothing is asserted except the
limits; the weights are random (the numbers of KLD and greedy agreement measure q4_k_m on random weights, not on
Gemma 4), so validation may report FAIL on its quality thresholds: that is recorded, not an error.

The checkpoint is built in a temporary directory removed at the end, or with --keep DIR in DIR/checkpoint, reused by
later runs with the same --variant/--layers/--text-only/--embed-std.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The driver stays small (no torch, numpy or transformers here): a child started by vfork/exec inherits its parent's
# peak RSS as its own starting ru_maxrss on Linux, so a large parent would inflate every measurement.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma4_export.exporter.variants import TINY_DIR, get_variant  # noqa: E402 (light: json only)

S, F = "sliding_attention", "full_attention"
STEPS = ("reference", "imatrix", "gguf", "validate", "baseline")
MARKER = "bench_checkpoint.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
GB = 1e9
# Limits the issue sets for E2B at full depth (bytes).
LIMITS = {"reference": 2.5 * GB, "validate": 8 * GB}
# transformers initialises Linear and Embedding weights with normal(0, initializer_range = 0.02), norms with ones.
# With that token embedding (tied to the output head) every next-token distribution is nearly uniform over the
# 262,144 ids, so the stored reference keeps its cap of entries (refdata.TOP_CAP) at every position: the largest
# reference and the most work per position, a bound from above. --embed-std 0.1 (the shipped tiny checkpoints'
# embedding after training) gives the other extreme: the residual stream is then dominated by the input token's own
# embedding, which the tied head predicts again with a margin of many nats (one stored entry per position).
EMBED_STD = 0.02


# ---- the checkpoint -------------------------------------------------------------------------------------------------
def bench_config(variant: str, layers: int | None, text_only: bool) -> dict:
    """The published config of `variant`, cut to its first `layers` layers (the last made full attention); the
    KV-shared layers, if any, stay the last ones of the published depth that remain."""
    cfg = copy.deepcopy(get_variant(variant).config())
    tc = cfg["text_config"]
    total = tc["num_hidden_layers"]
    n = total if layers is None else layers
    if not 1 <= n <= total:
        raise SystemExit(f"--layers {layers}: {variant} has {total} layers")
    if n < total:
        types = list(tc["layer_types"][:n])
        if F not in types:
            types[-1] = F
        shared = tc.get("num_kv_shared_layers") or 0
        tc.update(num_hidden_layers=n, layer_types=types, num_kv_shared_layers=max(0, shared - (total - n)))
    if text_only:
        return tc
    return cfg


def build_checkpoint(d: Path, variant: str, layers: int | None, text_only: bool, embed_std: float,
                     shard: str, seed: int) -> None:
    """Build the checkpoint in `d` (via a staging directory renamed into place). Runs in a child process."""
    import torch
    import transformers

    cfg = bench_config(variant, layers, text_only)
    conf_dict = dict(cfg)
    conf = transformers.AutoConfig.for_model(conf_dict.pop("model_type"), **conf_dict)
    cls = transformers.Gemma4ForCausalLM if text_only else getattr(transformers, cfg["architectures"][0])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    # Built on the CPU in bfloat16 (transformers' own init: normal(0, 0.02) weights, unit norms, its buffers): one
    # copy of the weights, about 2 bytes per parameter.
    model = cls._from_config(conf, dtype=torch.bfloat16)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    init_std = getattr(conf.get_text_config(), "initializer_range", 0.02) or 0.02
    if embed_std != init_std:
        with torch.no_grad():
            emb.mul_(embed_std / init_std)
    print(f"built {cls.__name__} with {n_params:,} parameters in {time.perf_counter() - t0:.0f}s", flush=True)

    stage = d.with_name(f".{d.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    t0 = time.perf_counter()
    model.save_pretrained(stage, max_shard_size=shard)
    del model, emb
    print(f"saved in {time.perf_counter() - t0:.0f}s", flush=True)
    tiny = TINY_DIR / "tiny-e2b"
    for name in TOKENIZER_FILES + ("generation_config.json",):  # the -it end-of-turn ids (1, 106, 50) with it
        if (tiny / name).is_file():
            shutil.copyfile(tiny / name, stage / name)
    # every id the tokenizer can produce must be a row of the 262,144-row embedding
    tok = json.loads((stage / "tokenizer.json").read_text())
    top = max(list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])])
    vocab = conf.get_text_config().vocab_size
    if top >= vocab:
        raise SystemExit(f"the tiny tokenizer has id {top}, beyond the vocabulary of {vocab}")
    marker = {"variant": variant, "layers": cfg.get("num_hidden_layers") or cfg["text_config"]["num_hidden_layers"],
              "text_only": text_only, "embed_std": embed_std, "seed": seed, "parameters": n_params,
              "class": cls.__name__, "transformers": transformers.__version__, "tokenizer_ids": top + 1}
    (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if d.exists():
        shutil.rmtree(d)
    os.replace(stage, d)


def safetensors_params(d: Path) -> tuple[int, int, int]:
    """(parameters, bytes, parameters of the largest decoder layer) of the checkpoint's safetensors files, from their
    headers."""
    n = size = 0
    per_layer: dict[str, int] = {}
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            hlen = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(hlen))
        for k, meta in header.items():
            if k == "__metadata__":
                continue
            count = 1
            for s in meta["shape"]:
                count *= s
            n += count
            size += meta["data_offsets"][1] - meta["data_offsets"][0]
            head, sep, rest = k.partition(".layers.")
            if sep and ("language_model" in head or head == "model"):
                key = rest.split(".", 1)[0]
                per_layer[key] = per_layer.get(key, 0) + count
    return n, size, max(per_layer.values(), default=0)


# ---- measuring ------------------------------------------------------------------------------------------------------
def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(step: str, argv: list[str], log: Path) -> dict:
    """Run argv in a fresh process (output to `log`) and return its seconds, CPU seconds and peak RSS."""
    print(f"[{time.strftime('%H:%M:%S')}] {step}: {' '.join(argv[:2])} ... (log: {log})", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120")
    load = os.getloadavg()[0]  # other work on the machine slows the step: recorded beside its seconds
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    peak = ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    r = {"step": step, "seconds": round(secs, 1), "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 1),
         "peak_rss_bytes": peak, "rc": rc, "log": str(log), "argv": argv,
         "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)}
    print(f"[{time.strftime('%H:%M:%S')}] {step}: rc {rc}, {secs:.1f}s ({r['cpu_seconds']:.0f} CPU s), peak RSS "
          f"{peak / GB:.2f} GB; load average {load:.2f} before, {r['load_average_after']:.2f} after", flush=True)
    return r


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def dir_size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("gemma4-export")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("gemma4-export")
    return [found] if found else [sys.executable, "-m", "gemma4_export.cli"]


# The whole-model baseline: today's whole-model reference computing what the stored reference holds, and checked
# against it. argv: checkpoint, reference directory, output JSON.
BASELINE = r"""
import json, sys, time
import numpy as np, torch
from gemma4_export.validate.reference import WholeModelReference
from gemma4_export.validate.refdata import ReferenceData

ckpt, refdir, out = sys.argv[1:4]
try:  # if memory runs out, the kernel's OOM killer takes this process first, nothing else on the machine
    open("/proc/self/oom_score_adj", "w").write("1000")
except OSError:
    pass
t0 = time.perf_counter()
ref = ReferenceData.load(refdir)
m = WholeModelReference(ckpt)
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
agree = rows = 0
max_dlp = 0.0
for w, win in enumerate(ref.windows):
    lg = torch.from_numpy(m.logits(win.ids)[win.half:-1])
    lp = torch.log_softmax(lg, dim=-1)
    c = ref.compact(w)
    tgt = torch.tensor(win.ids[win.half + 1:])
    mine = lp.gather(1, tgt[:, None])[:, 0].numpy()
    max_dlp = max(max_dlp, float(np.abs(mine - c.target_logprob).max()))
    agree += int((lp.argmax(-1).numpy() == c.top1).sum())
    rows += len(c)
    del lg, lp
    m._memo.clear()
logits_s = time.perf_counter() - t0
t0 = time.perf_counter()
eos = set(ref.eos_ids)
same = 0
for g in ref.generations:
    toks = m.greedy(g.ids, ref.spec["new_tokens"])
    cut = next((i + 1 for i, t in enumerate(toks) if t in eos), len(toks))
    same += int(toks[:cut] == g.tokens)
greedy_s = time.perf_counter() - t0
json.dump({"load_seconds": load_s, "logits_seconds": logits_s, "greedy_seconds": greedy_s, "scored_tokens": rows,
           "top1_agreement_with_stored": agree / max(1, rows), "max_abs_target_logprob_diff": max_dlp,
           "greedy_identical": f"{same}/{len(ref.generations)}"}, open(out, "w"), indent=2)
"""


# ---- the run --------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="e2b", help="e2b (default), 26b-a4b, 31b, e4b, 12b (-it names accepted)")
    ap.add_argument("--layers", type=int, help="build only the first N layers (default: all of the config's)")
    ap.add_argument("--text-only", action="store_true", help="Gemma4ForCausalLM with the text config (no towers)")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="build into DIR/checkpoint and keep it (reused when it matches), outputs in DIR")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    ap.add_argument("--quant", default="q4_k_m", help="GGUF preset to export and validate (default q4_k_m)")
    ap.add_argument("--calibration-chunks", type=int, default=16, help="imatrix step: chunks of 1024 tokens")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    ap.add_argument("--embed-std", type=float, default=EMBED_STD,
                    help=f"std of the token embedding (default {EMBED_STD}, transformers' init)")
    ap.add_argument("--shard-size", default="5GB", help="save_pretrained's max_shard_size (default 5GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force-baseline", action="store_true", help="run the baseline even when it does not fit")
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # child mode: build the checkpoint there
    a = ap.parse_args()
    # a terminated driver takes its running step with it (measure kills the child on the way out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    variant = get_variant(a.variant).base
    if a.build:
        build_checkpoint(a.build, variant, a.layers, a.text_only, a.embed_std, a.shard_size, a.seed)
        return
    steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise SystemExit(f"--steps: unknown {bad}; use {', '.join(STEPS)}")
    cfg = bench_config(variant, a.layers, a.text_only)
    tcfg = cfg.get("text_config", cfg)
    layers, total = tcfg["num_hidden_layers"], get_variant(variant).config()["text_config"]["num_hidden_layers"]

    work = a.keep or Path(tempfile.mkdtemp(prefix=f"bench-validate-{variant}-", dir=os.environ.get("TMPDIR", "/tmp")))
    work.mkdir(parents=True, exist_ok=True)
    ck, ref, out, logs = work / "checkpoint", work / "reference", work / "out", work / "logs"
    logs.mkdir(exist_ok=True)
    results: dict = {"variant": variant, "layers": layers, "published_layers": total, "text_only": a.text_only,
                     "quant": a.quant, "machine": {"cpus": os.cpu_count(), "mem_available_bytes": mem_available(),
                                                    "platform": sys.platform}, "steps": []}

    def save_json() -> None:
        if a.json:
            a.json.write_text(json.dumps(results, indent=2) + "\n")

    def fail(r: dict) -> None:
        save_json()
        raise SystemExit(f"{r['step']} failed (rc {r['rc']}); the end of {r['log']}:\n{tail(Path(r['log']))}")

    try:
        want = {"variant": variant, "layers": layers, "text_only": a.text_only, "embed_std": a.embed_std}
        have = json.loads((ck / MARKER).read_text()) if (ck / MARKER).is_file() else None
        if have is not None and any(have.get(k) != v for k, v in want.items()):
            raise SystemExit(f"{ck} holds another build ({ {k: have.get(k) for k in want} }); asked for {want}: "
                             "remove it or use another --keep DIR")
        if have is None:
            bf16 = estimate_bf16(variant, layers, a.text_only)
            avail = mem_available()
            if avail is not None and bf16 + 1.5 * GB > avail:
                raise SystemExit(f"building needs about {bf16 / GB:.1f} GB of memory (bf16 weights + 1.5 GB); "
                                 f"{avail / GB:.1f} GB is available: use --layers")
            free = shutil.disk_usage(work).free
            if bf16 * 1.05 > free:
                raise SystemExit(f"the checkpoint needs about {bf16 / GB:.1f} GB of disk; {free / GB:.1f} GB free")
            argv = [sys.executable, str(Path(__file__).resolve()), "--build", str(ck), "--variant", variant,
                    "--embed-std", str(a.embed_std), "--shard-size", a.shard_size, "--seed", str(a.seed),
                    "--layers", str(layers)] + (["--text-only"] if a.text_only else [])
            r = measure("build", argv, logs / "build.log")
            results["steps"].append(r)
            if r["rc"]:
                fail(r)
        marker = json.loads((ck / MARKER).read_text())
        n_params, ck_bytes, layer_params = safetensors_params(ck)
        results["checkpoint"] = {**marker, "tensor_parameters": n_params, "bytes": dir_size(ck),
                                 "safetensors_bytes": ck_bytes, "files": len(list(ck.glob("*.safetensors"))),
                                 "largest_layer_parameters": layer_params}
        save_json()
        x = cli()
        gguf = None
        for step in steps:
            if step == "reference":
                r = measure(step, x + ["reference", "--model-dir", str(ck), "--out", str(ref), "--force"],
                            logs / "reference.log")
                results["steps"].append(r)
                if r["rc"]:
                    fail(r)
                results["reference"] = reference_summary(ref)
            elif step == "imatrix":
                out.mkdir(exist_ok=True)
                r = measure(step, x + ["imatrix", "--model-dir", str(ck), "--out", str(out / "imatrix.gguf"),
                                       "--force", "--calibration-chunks", str(a.calibration_chunks)],
                            logs / "imatrix.log")
                results["steps"].append(r)
                if r["rc"]:
                    fail(r)
            elif step == "gguf":
                out.mkdir(exist_ok=True)
                imat = out / "imatrix.gguf"
                calib = ["--imatrix", str(imat)] if "imatrix" in steps and imat.is_file() else ["--no-calibrate"]
                r = measure(step, x + ["gguf", "--model-dir", str(ck), "--quant", a.quant, "--out", str(out),
                                       "--no-validate", "--force"] + calib, logs / "gguf.log")
                results["steps"].append(r)
                if r["rc"]:
                    fail(r)
                gguf = newest_gguf(out, a.quant)
                results["gguf"] = {"file": gguf.name, "bytes": gguf.stat().st_size}
            elif step == "validate":
                gguf = gguf or newest_gguf(out, a.quant)
                if not (ref / "reference.json").is_file():
                    raise SystemExit(f"validate needs a stored reference in {ref}: add the reference step")
                vj = gguf.with_name(gguf.name + ".validation.json")
                vj.unlink(missing_ok=True)
                towers = [] if a.text_only else ["--model-dir", str(ck)]  # the projector's checks need the towers
                r = measure(step, x + ["validate", str(gguf), "--reference", str(ref)] + towers, logs / "validate.log")
                results["steps"].append(r)
                # exit 1 with a report = the quality thresholds failed (random weights): recorded, not an error
                if r["rc"] not in (0, 1) or not vj.is_file():
                    fail(r)
                v = json.loads(vj.read_text())
                lg, gm = v.get("logits") or {}, v.get("generation") or {}
                results["validation"] = {
                    "passed": v.get("passed"), "failures": v.get("failures"), "kld_mean": lg.get("kld_mean"),
                    "kld_p999": lg.get("kld_p999"), "top1_agreement": lg.get("top1_agreement"),
                    "ppl_ref": lg.get("ppl_ref"), "ppl_ratio": lg.get("ppl_ratio"),
                    "greedy_exact": gm.get("exact_match_rate"), "greedy_agreement": gm.get("agreement_rate"),
                    "tokens": lg.get("tokens"), "seconds": v.get("seconds")}
            elif step == "baseline":
                if not (ref / "reference.json").is_file():
                    raise SystemExit(f"baseline needs a stored reference in {ref}: add the reference step")
                need, avail = n_params * 4 + 2 * GB, mem_available()
                results["baseline_need_bytes"] = need
                if avail is not None and need > avail and not a.force_baseline:
                    msg = (f"baseline skipped: the whole model in fp32 needs {n_params * 4 / GB:.1f} GB + 2 GB = "
                           f"{need / GB:.1f} GB; MemAvailable is {avail / GB:.1f} GB ({(need - avail) / GB:.1f} GB "
                           "short)")
                    print(msg, flush=True)
                    results["baseline"] = {"skipped": msg}
                    continue
                bj = work / "baseline.json"
                bj.unlink(missing_ok=True)
                r = measure(step, [sys.executable, "-c", BASELINE, str(ck), str(ref), str(bj)],
                            logs / "baseline.log")
                results["steps"].append(r)
                if r["rc"]:
                    why = f"killed by signal {-r['rc']}" if r["rc"] < 0 else f"exit {r['rc']}"
                    results["baseline"] = {"error": why, "log_tail": tail(Path(r["log"]), 30)}
                    print(f"baseline failed ({why}; signal 9 is usually the OOM killer):\n"
                          f"{tail(Path(r['log']), 30)}", flush=True)
                else:
                    results["baseline"] = json.loads(bj.read_text())
            save_json()
        if "reference" not in results and (ref / "reference.json").is_file():
            results["reference"] = {**reference_summary(ref), "from_an_earlier_run": True}
        report(results, layers == total)
        save_json()
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def estimate_bf16(variant: str, layers: int, text_only: bool) -> int:
    """Bytes of the bf16 checkpoint: the text parameters of the config as cut (the package's own count) plus the
    towers (the published total less the published text): a guard before building, not a measurement."""
    from gemma4_export.exporter.arch import parse_config
    from gemma4_export.quant.plan import text_parameters  # light: no torch

    v = get_variant(variant)
    text = text_parameters(parse_config(bench_config(variant, layers, False), source="bench"))
    towers = 0 if text_only else max(0, (v.published_parameters or 0) - text_parameters(v.arch()))
    return 2 * (text + towers)


def reference_summary(ref: Path) -> dict:
    meta = json.loads((ref / "reference.json").read_text())["meta"]
    return {"bytes": dir_size(ref), **{k: meta.get(k) for k in (
        "entries_per_position", "tail_mass_mean", "layers_read", "seconds", "text_parameters")}}


def newest_gguf(out: Path, quant: str) -> Path:
    found = sorted(out.glob(f"*-{quant}.gguf"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no *-{quant}.gguf in {out}: add the gguf step")
    return found[-1]


def report(res: dict, full_depth: bool) -> None:
    ck = res.get("checkpoint", {})
    print()
    print(f"## {res['variant']}: {res['layers']} of {res['published_layers']} layers"
          + (", text only" if res["text_only"] else ", towers included")
          + f"; {ck.get('tensor_parameters', 0):,} parameters, {ck.get('bytes', 0) / GB:.2f} GB bf16 in "
            f"{ck.get('files')} file(s); largest decoder layer {ck.get('largest_layer_parameters', 0) / 1e6:.0f}M "
            f"parameters ({ck.get('largest_layer_parameters', 0) * 4 / GB:.2f} GB in fp32); "
            f"{res['machine']['cpus']} cores")
    print()
    print("| step | seconds | CPU seconds | peak RSS (GB) | output |")
    print("|---|---:|---:|---:|---|")
    outputs = {"build": f"{ck.get('bytes', 0) / GB:.2f} GB checkpoint",
               "reference": f"{res.get('reference', {}).get('bytes', 0) / 1e6:.1f} MB reference directory",
               "gguf": f"{res.get('gguf', {}).get('bytes', 0) / GB:.2f} GB {res.get('gguf', {}).get('file', '')}",
               "imatrix": "imatrix file", "validate": "validation report", "baseline": "logits + greedy, whole model in fp32"}
    for r in res["steps"]:
        print(f"| {r['step']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_bytes'] / GB:.2f} | "
              f"{outputs.get(r['step'], '')}{'' if r['rc'] == 0 else ' (exit %d)' % r['rc']} |")
    if "reference" in res:
        m = res["reference"]
        s = m.get("seconds") or {}
        print(f"\nreference{' (stored by an earlier run)' if m.get('from_an_earlier_run') else ''}: "
              f"{m['bytes'] / 1e6:.1f} MB; entries_per_position {m['entries_per_position']:.1f}, "
              f"tail_mass_mean {m['tail_mass_mean']:.2e}, layers_read {m['layers_read']}; "
              + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()))
    if "validation" in res:
        v = res["validation"]
        print(f"validation ({res['quant']}): KLD mean {v['kld_mean']:.6f}, p99.9 {v['kld_p999']:.6f}, top-1 "
              f"{v['top1_agreement']:.4f}, PPL ratio {v['ppl_ratio']:.5f} (reference PPL {v['ppl_ref']:.1f}), greedy "
              f"exact {v['greedy_exact']:.3f}; {'PASS' if v['passed'] else 'FAIL on its quality thresholds'}")
    if "baseline" in res:
        b = res["baseline"]
        if "top1_agreement_with_stored" in b:
            print(f"baseline against the stored reference: top-1 {b['top1_agreement_with_stored']:.4f}, max |Δ log p| "
                  f"{b['max_abs_target_logprob_diff']:.2e}, greedy identical {b['greedy_identical']}; load "
                  f"{b['load_seconds']:.1f}s, logits {b['logits_seconds']:.1f}s, greedy {b['greedy_seconds']:.1f}s")
        else:
            print(b.get("skipped") or f"baseline: {b.get('error')}")
    peaks = {r["step"]: r["peak_rss_bytes"] for r in res["steps"]}
    applies = res["variant"] == "e2b" and full_depth
    res["limits"] = []
    print()
    for step, lim in LIMITS.items():
        if step not in peaks:
            continue
        ok = peaks[step] < lim
        res["limits"].append({"step": step, "limit_bytes": lim, "peak_bytes": peaks[step], "passed": ok,
                              "applies": applies})
        line = f"{step} peak {peaks[step] / GB:.2f} GB < {lim / GB:g} GB"
        print(f"{'PASS' if ok else 'FAIL'}: {line}" if applies else
              f"(limit for E2B at full depth only) {line}: {'within' if ok else 'over'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
