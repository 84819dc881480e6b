"""Measure validation metrics of every tiny variant at every preset of a target, to calibrate thresholds.

    python scripts/calibrate.py [--target gguf|mlx|onnx] [--out docs/thresholds-gguf.md]

Prints one row per variant and preset, and per preset the worst value of each metric across variants: the
thresholds in gemma4_export/quant/presets.py sit at about 2x those worst values (PPL excess and 1 - top-1
likewise), rounded. Not a test.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gemma4_export.exporter.variants import TINY, get_variant
from gemma4_export import api
from gemma4_export.quant.presets import presets_of
from gemma4_export.validate.harness import validate_artifact


def export(target: str, variant: str, preset: str, out: Path) -> Path:
    return api.export(target, variant, preset, out, force=True).path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gguf")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows, worst = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in TINY:
            ref = api.reference(v)
            for p in presets_of(a.target):
                rep = validate_artifact(export(a.target, v, p, Path(tmp)), v, reference=ref, write=False)
                lg, gm = rep.logits, rep.generation
                m = dict(kld_mean=lg.kld_mean, kld_p999=lg.kld_p999, top1=lg.top1_agreement, ppl=lg.ppl_ratio,
                         exact=gm.exact_match_rate, first_div=gm.mean_first_divergence, maxdiff=lg.max_logit_diff)
                rows.append((v, p, rep.bits_per_weight, m))
                print(v, p, {k: round(x, 6) for k, x in m.items()}, flush=True)
                w = worst.setdefault(p, dict(m))
                for k in ("kld_mean", "kld_p999", "ppl", "maxdiff"):
                    w[k] = max(w[k], m[k])
                for k in ("top1", "exact", "first_div"):
                    w[k] = min(w[k], m[k])
    head = "| variant | preset | bpw | KLD mean | KLD p99.9 | top-1 | PPL ratio | greedy exact | first div. | max logit diff |"
    lines = [head, "|" + "---|" * 10]
    fmt = lambda m: (f"{m['kld_mean']:.2e} | {m['kld_p999']:.2e} | {m['top1']:.4f} | {m['ppl']:.5f} | "  # noqa: E731
                     f"{m['exact']:.3f} | {m['first_div']:.1f} | {m['maxdiff']:.4f}")
    for v, p, bpw, m in rows:
        lines.append(f"| {v} | {p} | {bpw:.2f} | {fmt(m)} |")
    lines += ["", "Worst across variants:", "", head.replace("| variant | preset | bpw ", "| preset "),
              "|" + "---|" * 8]
    for p, w in worst.items():
        lines.append(f"| {p} | {fmt(w)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(f"# Measured validation metrics, {a.target}, tiny variants\n\nMade by `python "
                         f"scripts/calibrate.py --target {a.target}`.\n\n" + text)


if __name__ == "__main__":
    main()
