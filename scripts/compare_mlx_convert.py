"""Compare gemma4-export's MLX 4-bit artifact with `mlx_lm.convert -q --q-bits 4` on the same checkpoint, measured
by the same harness (same windows, prompts and fp32 reference).

    python scripts/compare_mlx_convert.py [--variants tiny-e2b tiny-31b ...]
Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gemma4_export.exporter.source import ModelSource
from gemma4_export.exporter.tokenizer import read_tokenizer
from gemma4_export.exporter.variants import TINY, get_variant
from gemma4_export.progress import Silent
from gemma4_export import api
from gemma4_export.validate.harness import EvalSpec, artifact_bytes, run_validation
from gemma4_export.validate.mlxrt import MLXRunner
from gemma4_export.validate.reference import Reference


def measure(path: Path, ref: Reference, src: ModelSource) -> dict:
    spec = EvalSpec.for_arch(src.arch)
    eos = read_tokenizer(src.directory, src.arch.vocab_size).eos_ids
    lm, gm, tok, _ = run_validation(MLXRunner(path), ref, src.arch, spec, Silent(), eos_ids=eos)
    return {"MB": artifact_bytes(path) / 1e6, "kld": lm.kld_mean, "top1": lm.top1_agreement,
            "ppl_ratio": lm.ppl_ratio, "exact": gm.exact_match_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", nargs="*", default=list(TINY))
    a = ap.parse_args()
    print("| variant | artifact | size MB | mean KLD | top-1 | PPL ratio | greedy exact |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for v in a.variants:
            src = ModelSource.open(v, need_weights=True)
            ref = Reference(get_variant(v).local_dir)
            ours = api.export("mlx", v, "4bit", out=tmp, force=True).path
            theirs = Path(tmp) / f"{v}-mlx_lm-convert-4bit"
            # mlx-lm's gemma4 ModelArgs overrides text_config.vocab_size with a top-level vocab_size that defaults
            # to 262144; the tiny configs keep it in text_config only, so give mlx_lm.convert a copy that has both.
            hf = Path(tmp) / f"{v}-hf"
            shutil.copytree(src.directory, hf, dirs_exist_ok=True)
            cfg = json.loads((hf / "config.json").read_text())
            cfg["vocab_size"] = src.arch.vocab_size
            (hf / "config.json").write_text(json.dumps(cfg))
            subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(hf),
                            "--mlx-path", str(theirs), "-q", "--q-bits", "4"], check=True, capture_output=True)
            for label, path in (("gemma4-export 4bit", ours), ("mlx_lm.convert -q --q-bits 4", theirs)):
                m = measure(path, ref, src)
                print(f"| {v} | {label} | {m['MB']:.2f} | {m['kld']:.5f} | {m['top1']:.4f} | {m['ppl_ratio']:.4f} | "
                      f"{m['exact']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
