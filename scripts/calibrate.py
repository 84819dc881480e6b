"""Measure validation metrics of every tiny variant at every preset of a target, to calibrate thresholds.

    python scripts/calibrate.py [--target gguf|mlx|onnx] [--presets q4_k_m,q3_k_m] [--variants tiny-e2b,tiny-e2b-ft]
                                [--out docs/thresholds-gguf.md]

Prints one row per variant and preset, and per preset the worst value of each metric across variants: the
thresholds in gemma4_export/quant/presets.py sit at about 2x those worst values (PPL excess and 1 - top-1
likewise), rounded. Presets under 8 bits are measured both with calibration (the default) and without
(--no-calibrate), and the worst of the two counts, since users can export either way. Not a test.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gemma4_export.exporter.variants import TINY
from gemma4_export import api
from gemma4_export.quant.presets import presets_of
from gemma4_export.validate.harness import validate_artifact


def export(target: str, variant: str, preset: str, out: Path, calibrate: bool | None) -> tuple[Path, bool]:
    r = api.export(target, variant, preset, out, force=True, calibrate=calibrate)
    return r.path, r.plan.calibration is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gguf")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--presets", help="comma-separated presets (default: all of the target's)")
    ap.add_argument("--variants", help="comma-separated variants (default: every tiny one: " + ",".join(TINY) + ")")
    a = ap.parse_args()
    from gemma4_export.quant.calibrate import NEEDS_CALIBRATION
    from gemma4_export.quant.rules import get_preset
    from gemma4_export.targets.registry import get_target
    rows, worst = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in (a.variants.split(",") if a.variants else TINY):
            ref = api.reference(v)
            for p, cal in [(p, c) for p in (a.presets.split(",") if a.presets else presets_of(a.target))
                           for c in (None, False)]:
                if cal is False and (not api.needs_calibration(api.plan(v, a.target, p), get_target(a.target))
                                     or get_preset(p, a.target).base in NEEDS_CALIBRATION):
                    continue  # 8 bits and up are never calibrated; Q2_K only ever is
                path, calibrated = export(a.target, v, p, Path(tmp), cal)
                rep = validate_artifact(path, v, reference=ref, write=False)
                lg, gm = rep.logits, rep.generation
                m = dict(kld_mean=lg.kld_mean, kld_p999=lg.kld_p999, top1=lg.top1_agreement, ppl=lg.ppl_ratio,
                         exact=gm.exact_match_rate, first_div=gm.mean_first_divergence, maxdiff=lg.max_logit_diff)
                label = f"{p} ({'calibrated' if calibrated else 'plain'})"
                rows.append((v, label, rep.bits_per_weight, m))
                print(v, label, {k: round(x, 6) for k, x in m.items()}, flush=True)
                w = worst.setdefault(p, dict(m))  # the worst of calibrated and plain
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
