"""The `gemma4-export` command: a thin layer that parses options and calls the library (gemma4_export.api).

Errors from bad input are printed as one line, without a traceback (set GEMMA4_EXPORT_DEBUG=1 to see it); a mistyped
command or option gets click's usage error (exit status 2). Tables fit the terminal's width; when stdout is not a
terminal (a pipe, a file, a CI log) listings come as plain lines, one row per line, and no line is wrapped.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import Gemma4ExportError
from .targets.registry import get_target, target_names

app = typer.Typer(
    name="gemma4-export",
    help="Export Gemma 4 checkpoints to GGUF, ONNX and MLX with Gemma 4 quantization rules, validated in each runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _line(console: Console, text, **kw) -> None:
    """One logical line, never wrapped or cut by rich, whatever the width (the terminal wraps it if it must): for
    messages, summaries and paths, which must stay whole to be read, copied and grepped."""
    console.print(text, soft_wrap=True, highlight=False, **kw)


def _listing(table, lines) -> None:
    """A listing on stdout: on a terminal, the table that report fitted to its width; in a pipe or a file (or a
    terminal too narrow for any table: table is None), plain lines, one row per line, without markup, highlighting
    or wrapping. table and lines are called only for the form that is printed."""
    t = table(out.width) if out.is_terminal else None
    if t is not None:
        out.print(t)
        return
    for ln in lines():
        out.print(ln, soft_wrap=True, markup=False, highlight=False, emoji=False)


# Options shared by several commands.
VariantOpt = Annotated[
    Optional[str], typer.Option("--variant", "-v", help="A registered variant (see `gemma4-export variants`).")
]
ModelDirOpt = Annotated[
    Optional[Path], typer.Option("--model-dir", "-m", help="A local Gemma 4 checkpoint directory (safetensors).")
]
TensorTypeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--tensor-type", help="Override one tensor's type: PATTERN=TYPE (regex on the name). Repeatable."),
]
ReferenceOpt = Annotated[
    Optional[Path], typer.Option("--reference", help="A stored reference directory (`gemma4-export reference`): "
                                                     "validate against it without loading the checkpoint.")
]
PleTypeOpt = Annotated[
    Optional[str], typer.Option("--ple-type", help="Type of the per-layer-embedding table (E2B/E4B).")
]


def _presets_help(name: str) -> str:
    t = get_target(name)
    return f"Preset: {' '.join(t.presets)} (default {t.default_preset})."


def _all_presets_help() -> str:
    return "Preset of the target (" + "; ".join(f"{n}: {' '.join(get_target(n).presets)}" for n in target_names()) \
        + "). Default: the target's own default."


def _quant_opt(name: str):
    return Annotated[Optional[str], typer.Option("--quant", "-q", help=_presets_help(name))]


def _device_opt(name: str):
    return Annotated[str, typer.Option("--device", help=f"Validation device: {get_target(name).devices_help}.")]


def _validate_opt(name: str):
    return Annotated[bool, typer.Option("--validate/--no-validate",
                                        help=f"Validate in {get_target(name).runtime_name} after export.")]


AdapterOpt = Annotated[
    Optional[Path], typer.Option("--adapter", help="A PEFT LoRA adapter directory (adapter_config.json, "
                                 "adapter_model.safetensors), merged in fp32 before quantization.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing artifact.")]
CalibrateOpt = Annotated[Optional[bool], typer.Option(
    "--calibrate/--no-calibrate", show_default=False,
    help="Weight the quantization error by activation statistics from the fp32 model (default: on for presets "
         "under 8 bits).")]
CalibrationOpt = Annotated[Optional[Path], typer.Option(
    "--calibration", help="A UTF-8 text file to calibrate on instead of the shipped calibration set.")]
ImatrixOpt = Annotated[Optional[Path], typer.Option(
    "--imatrix", help="Use this llama.cpp GGUF imatrix file (from `gemma4-export imatrix` or llama-imatrix) "
                      "instead of calibrating.")]
GptqOpt = Annotated[bool, typer.Option(
    "--gptq/--no-gptq",
    help="With calibration, feed each block's rounding error forward onto the channels not yet quantized (GPTQ, "
         "from the inputs' second moments). --no-gptq: importance-weighted rounding only (for GGUF, what "
         "llama-quantize --imatrix writes).")]
ChunksOpt = Annotated[Optional[int], typer.Option(
    "--calibration-chunks", help="Calibration chunks of 1024 tokens (default 16).")]


def _size(text: str | None) -> int | None:
    """'2.5GB', '800MB', '1.2G', or bytes."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise typer.BadParameter(f"{text!r}: give a size such as 2.5GB or 800MB", param_hint="--max-size")
    unit = (m.group(2) or "b").rstrip("b").rstrip("i")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit]
    return int(float(m.group(1)) * scale)


TargetBpwOpt = Annotated[Optional[float], typer.Option(
    "--target-bpw", help="Choose each tensor class's type from its measured sensitivity (KLD on calibration text) "
                         "to minimise KLD at this many bits per weight, among the target's types.")]
QatOpt = Annotated[str, typer.Option(
    "--qat", help="A quantization-aware-trained checkpoint's 4-bit lattice: auto writes every tensor found on it "
                  "(nearly all its groups of 32) with the trained steps, in --quant qat and the 4-bit presets; on "
                  "writes every tensor with any group on it; off never.")]
MaxSizeOpt = Annotated[Optional[str], typer.Option(
    "--max-size", help="As --target-bpw, for the artifact's whole size such as 2.5GB.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"gemma4-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    pass


@app.command()
def variants(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the Gemma 4 variants: parameters, architecture features, towers, and whether weights are local.

    Example: gemma4-export variants
    """
    from .report import variants_lines, variants_table

    if as_json:
        from .exporter.checkpoint import weights_present
        from .exporter.variants import VARIANTS

        rows = []
        for v in VARIANTS.values():
            a = v.arch()
            rows.append({"variant": v.name, "hub_id": v.hub_id, "class": a.architecture,
                         "parameters": v.published_parameters, "layers": a.num_layers, "features": a.features(),
                         "towers": list(a.towers), "local": weights_present(v)})
        out.print_json(json.dumps(rows))
        return
    _listing(lambda width: variants_table(width=width), variants_lines)


@app.command()
def plan(
    variant: VariantOpt = None,
    model_dir: ModelDirOpt = None,
    quant: Annotated[Optional[str], typer.Option("--quant", "-q", help=_all_presets_help())] = None,
    target: Annotated[str, typer.Option("--target", "-t", help=f"{', '.join(target_names())}: whose presets and "
                                                               "types.")] = "gguf",
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="MLX quantization group: 32, 64, 128.")] = None,
    tensor_type: TensorTypeOpt = None,
    ple_type: PleTypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    all_rows: Annotated[bool, typer.Option("--all", help="List every tower tensor instead of one row per tower.")] = False,
    adapter: AdapterOpt = None,
    target_bpw: TargetBpwOpt = None,
    max_size: MaxSizeOpt = None,
    qat: QatOpt = "auto",
    towers: Annotated[bool, typer.Option("--towers", help="Show the vision/audio towers' plan (the artifact they "
                                                          "go to: GGUF's mmproj file) instead of the text plan.")] = False,
    mmproj: MmprojOpt = None,
) -> None:
    """Show which type every tensor gets, and why, with totals (parameters, size, bits per weight).

    Examples:
      gemma4-export plan --variant e2b --quant q4_k_m
      gemma4-export plan --variant 26b-a4b --quant q4_k_m --json
      gemma4-export plan --model-dir ./gemma-4-E2B-it --quant q5_k_m --tensor-type 'attn_q=Q8_0'
      gemma4-export plan --variant tiny-e2b --quant q4_k_m --target-bpw 5.5
      gemma4-export plan --variant e2b --towers --mmproj q8_0
    """
    from . import api
    from .report import plan_lines, plan_summary, plan_table

    if towers or mmproj:
        p = api.tower_plan_of(target=target, preset=quant, variant=variant, model_dir=model_dir, tower_type=mmproj)
        if as_json:
            sys.stdout.write(json.dumps(p.to_json()) + "\n")
            return
        _listing(lambda width: plan_table(p, True, width=width), lambda: plan_lines(p, True))
        _line(out, plan_summary(p))
        return
    sized = {}
    if target_bpw is not None or max_size is not None:
        from .progress import RichReporter

        sized = {"target_bpw": target_bpw, "max_size": _size(max_size), "reporter": RichReporter(err)}
    p = api.plan(target=target, preset=quant, variant=variant, model_dir=model_dir, overrides=tensor_type, adapter=adapter,
                 ple_type=ple_type, group_size=group_size, qat=qat, **sized)
    if as_json:
        sys.stdout.write(json.dumps(p.to_json()) + "\n")
        return
    _listing(lambda width: plan_table(p, all_rows, width=width), lambda: plan_lines(p, all_rows))
    _line(out, plan_summary(p))


MmprojOpt = Annotated[Optional[str], typer.Option(
    "--mmproj", help="The projector (vision/audio towers) beside the GGUF: f16 (default), q8_0, f32 or none.")]
TextOnlyOpt = Annotated[bool, typer.Option("--text-only", help="Leave the vision/audio towers out.")]


def _export(target: str, variant, model_dir, quant, out_dir, validate: bool, device: str, adapter=None,
            calibrate=None, calibration=None, imatrix=None, chunks=None, **kw) -> None:
    """The shared body of the export commands: the library's one pipeline, then its summary and validation."""
    from . import api
    from .progress import RichReporter

    r = api.export(target, preset=quant, out=out_dir, variant=variant, model_dir=model_dir, adapter=adapter,
                   reporter=RichReporter(err), calibrate=calibrate, calibration=calibration, imatrix=imatrix,
                   calibration_chunks=chunks, calibration_device=device if device in ("cuda", "mps") else "cpu",
                   **kw)
    _finish(r, validate, variant, model_dir, device, adapter)


@app.command()
def gguf(
    variant: VariantOpt = None,
    model_dir: ModelDirOpt = None,
    quant: _quant_opt("gguf") = None,
    out: OutOpt = Path("."),
    tensor_type: TensorTypeOpt = None,
    ple_type: PleTypeOpt = None,
    force: ForceOpt = False,
    validate: _validate_opt("gguf") = True,
    device: _device_opt("gguf") = "cpu",
    adapter: AdapterOpt = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Quantizer threads (default: all cores).")] = None,
    target_bpw: TargetBpwOpt = None,
    max_size: MaxSizeOpt = None,
    calibrate: CalibrateOpt = None,
    calibration: CalibrationOpt = None,
    imatrix: ImatrixOpt = None,
    calibration_chunks: ChunksOpt = None,
    gptq: GptqOpt = True,
    qat: QatOpt = "auto",
    mmproj: MmprojOpt = None,
    text_only: TextOnlyOpt = False,
) -> None:
    """Export a GGUF for llama.cpp (writes <variant>-<quant>.gguf and, for a checkpoint with vision/audio towers,
    its projector mmproj-<variant>-<type>.gguf), then validate both against the fp32 model.

    Examples:
      gemma4-export gguf --variant tiny-e2b --quant q4_k_m --out out/
      gemma4-export gguf --variant e2b-it --quant q5_k_m --ple-type q8_0
      gemma4-export gguf --model-dir ./my-gemma4 --quant q8_0 --no-validate
      gemma4-export gguf --variant tiny-e2b --quant q4_k_m --target-bpw 4.5
      gemma4-export gguf --variant e2b-it --quant q4_k_m --mmproj q8_0
    """
    _export("gguf", variant, model_dir, quant, out, validate, device, adapter, calibrate, calibration, imatrix,
            calibration_chunks, overrides=tensor_type, ple_type=ple_type, force=force, threads=threads,
            target_bpw=target_bpw, max_size=_size(max_size), qat=qat, towers=not text_only, tower_type=mmproj,
            gptq=gptq)


@app.command()
def mlx(
    variant: VariantOpt = None,
    model_dir: ModelDirOpt = None,
    quant: _quant_opt("mlx") = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Quantization group: 32, 64 or 128.")] = None,
    out: OutOpt = Path("."),
    tensor_type: TensorTypeOpt = None,
    ple_type: PleTypeOpt = None,
    force: ForceOpt = False,
    validate: _validate_opt("mlx") = True,
    device: _device_opt("mlx") = "cpu",
    adapter: AdapterOpt = None,
    calibrate: CalibrateOpt = None,
    calibration: CalibrationOpt = None,
    imatrix: ImatrixOpt = None,
    calibration_chunks: ChunksOpt = None,
    gptq: GptqOpt = True,
    qat: QatOpt = "auto",
    text_only: TextOnlyOpt = False,
    target_bpw: TargetBpwOpt = None,
    max_size: MaxSizeOpt = None,
) -> None:
    """Export an MLX directory for mlx-lm (<variant>-mlx-<quant>/), then validate it against the fp32 model.

    Examples:
      gemma4-export mlx --variant tiny-e2b --quant 4bit --out out/
      gemma4-export mlx --variant e4b-it --quant mixed --group-size 32 --device gpu
      gemma4-export mlx --variant tiny-31b --quant 4bit --target-bpw 5.0
    """
    _export("mlx", variant, model_dir, quant, out, validate, device, adapter, calibrate, calibration, imatrix,
            calibration_chunks, overrides=tensor_type, ple_type=ple_type, force=force, group_size=group_size, qat=qat,
            towers=not text_only, target_bpw=target_bpw, max_size=_size(max_size), gptq=gptq)


@app.command()
def onnx(
    variant: VariantOpt = None,
    model_dir: ModelDirOpt = None,
    quant: _quant_opt("onnx") = None,
    out: OutOpt = Path("."),
    tensor_type: TensorTypeOpt = None,
    ple_type: PleTypeOpt = None,
    force: ForceOpt = False,
    validate: _validate_opt("onnx") = True,
    device: _device_opt("onnx") = "cpu",
    adapter: AdapterOpt = None,
    calibrate: CalibrateOpt = None,
    calibration: CalibrationOpt = None,
    imatrix: ImatrixOpt = None,
    calibration_chunks: ChunksOpt = None,
    gptq: GptqOpt = True,
    into: Annotated[Optional[Path], typer.Option(
        "--into", help="Add this preset's graphs to an existing ONNX directory of the same checkpoint (several "
                       "dtypes in one directory, as onnx-community repositories hold them) instead of writing "
                       "<variant>-onnx-<quant>/ under --out.")] = None,
    qat: QatOpt = "auto",
    text_only: TextOnlyOpt = False,
    target_bpw: TargetBpwOpt = None,
    max_size: MaxSizeOpt = None,
) -> None:
    """Export the ONNX graphs transformers.js and onnxruntime-genai load (<variant>-onnx-<quant>/), then validate.

    Examples:
      gemma4-export onnx --variant tiny-e2b --quant int4 --out out/
      gemma4-export onnx --variant tiny-e2b --quant q4f16 --into out/tiny-e2b-onnx-int4
      gemma4-export onnx --variant e2b-it --quant int4 --ple-type INT8 --device cuda
      gemma4-export onnx --variant tiny-31b --quant int4 --max-size 3MB
    """
    _export("onnx", variant, model_dir, quant, out, validate, device, adapter, calibrate, calibration, imatrix,
            calibration_chunks, overrides=tensor_type, ple_type=ple_type, force=force, into=into, qat=qat,
            towers=not text_only, target_bpw=target_bpw, max_size=_size(max_size), gptq=gptq)


def _finish(r, validate: bool, variant, model_dir, device: str, adapter=None) -> None:
    """After an export: its plan summary, where it went, then (unless --no-validate) its validation."""
    from .report import human_bytes, plan_summary

    secs = ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items())
    _line(err, plan_summary(r.plan))
    _line(err, f"wrote {r.path} ({human_bytes(r.bytes)}; {secs})", markup=False)
    if r.towers is not None:
        _line(err, f"projector {r.towers} ({human_bytes(r.towers.stat().st_size)}; {plan_summary(r.tower_plan)})",
              markup=False)
    if validate:
        _validate_and_exit(r.validate_as or r.path, variant, model_dir, device, adapter)


def _validate_and_exit(artifact: Path, variant, model_dir, device: str, adapter=None, reference=None,
                       accumulate: str = "native", windows: int | None = None, prompts: int | None = None) -> None:
    from . import api
    from .progress import RichReporter
    from .validate.harness import ValidationFailed

    report = api.validate(artifact, variant=variant, model_dir=model_dir, device=device, adapter=adapter,
                          reporter=RichReporter(err), reference=reference, accumulate=accumulate, windows=windows,
                          prompts=prompts)
    from rich.markdown import Markdown

    out.print(Markdown(report.to_markdown()))
    if not report.passed:
        raise ValidationFailed(f"{artifact.name} failed validation: " + "; ".join(report.failures))


@app.command()
def validate(
    artifact: Annotated[Path, typer.Argument(help="A GGUF file, ONNX directory or MLX directory written by gemma4-export.")],
    variant: VariantOpt = None,
    model_dir: ModelDirOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or mps (reference and runtime).")] = "cpu",
    adapter: AdapterOpt = None,
    reference: ReferenceOpt = None,
    accumulate: Annotated[str, typer.Option(
        "--accumulate", help="MLX on a CPU: native (mlx's CPU kernels, which sum quantized matmuls in bfloat16) or "
                             "float32 (float32 sums, as mlx's Metal kernels do).")] = "native",
    windows: Annotated[Optional[int], typer.Option(
        "--windows", min=1, help="Held-out windows to score (default: the standard evaluation's; fewer is quicker "
                                 "where the runtime is slow, as mlx's quantized kernels on a CPU).")] = None,
    prompts: Annotated[Optional[int], typer.Option(
        "--prompts", min=1, help="Chat prompts for greedy generation (default: all of the standard set).")] = None,
) -> None:
    """Run an artifact in its own runtime and compare it with transformers in fp32 on the same tokens.

    The fp32 reference is computed here (streamed: one decoder layer in memory at a time), or read from a directory
    that `gemma4-export reference` wrote (--reference): then the text model is not loaded at all, and the towers
    (the projector, the encoders) are checked only when --variant or --model-dir names the same checkpoint. Writes
    ARTIFACT.validation.json and .md beside it; exits 1 when any threshold fails.

    Examples:
      gemma4-export validate out/tiny-e2b-q4_k_m.gguf
      gemma4-export validate out/e2b-it-q4_k_m.gguf --reference ref/e2b-it
      gemma4-export validate out/e2b-it-q4_k_m.gguf --reference ref/e2b-it --model-dir ./gemma-4-E2B-it
      gemma4-export validate out/tiny-31b-mlx-4bit --accumulate float32
    """
    if reference is not None and adapter and not (variant or model_dir):
        raise typer.BadParameter("--reference replaces --adapter: the stored reference says which weights it is of "
                                 "(with --variant or --model-dir for the towers, --adapter completes that "
                                 "checkpoint)", param_hint="--reference")
    _validate_and_exit(artifact, variant, model_dir, device, adapter, reference, accumulate, windows, prompts)


@app.command()
def reference(
    variant: VariantOpt = None,
    model_dir: ModelDirOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (reference.json, logprobs.npz, "
                                                             "tokenizer/).")] = ...,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or mps: where the layers run.")] = "cpu",
    windows: Annotated[Optional[int], typer.Option("--windows", help="Held-out windows to score.")] = None,
    prompts: Annotated[Optional[int], typer.Option("--prompts", help="Chat prompts for greedy generation.")] = None,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Greedy tokens per prompt.")] = 64,
    adapter: AdapterOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DIR if it exists.")] = False,
) -> None:
    """Compute the fp32 reference once and store it: every artifact of these weights is then validated against it
    (validate --reference, matrix --reference) without loading the checkpoint.

    The checkpoint runs through transformers' own Gemma 4 modules one decoder layer at a time (under 2.5 GB for
    E2B); the directory holds the evaluation token ids, compact log-probabilities, greedy continuations with their
    margins, the tokenizer-parity ids and the checkpoint's digest.

    Examples:
      gemma4-export reference --variant tiny-e2b --out ref/tiny-e2b
      gemma4-export reference --model-dir ./my-finetune --out ref/my-finetune
    """
    from . import api
    from .progress import RichReporter
    from .report import human_bytes

    data = api.reference(variant=variant, model_dir=model_dir, out=out_dir, device=device, adapter=adapter,
                         windows=windows, prompts=prompts, new_tokens=new_tokens, force=force,
                         reporter=RichReporter(err))
    m = data.meta
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    _line(out, f"reference of {m['source']} ({m['source_digest'][:19]}...): {len(data.windows)} windows of "
               f"{data.spec['window']} tokens, {len(data.generations)} prompts x {data.spec['new_tokens']} greedy "
               f"tokens; {m['entries_per_position']:.0f} stored log-probabilities per scored token (tail mass "
               f"{m['tail_mass_mean']:.1e}); transformers {m['transformers']}, {m['dtype']}, {m['device']}; "
               f"{m['seconds']['total']:.1f}s", markup=False)
    _line(out, f"wrote {out_dir} ({human_bytes(size)})", markup=False)


@app.command()
def imatrix(
    variant: VariantOpt = None,
    model_dir: ModelDirOpt = None,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="The imatrix file to write (.gguf).")] = ...,
    calibration: CalibrationOpt = None,
    calibration_chunks: ChunksOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or mps: where the layers run.")] = "cpu",
    adapter: AdapterOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
) -> None:
    """Measure the importance matrix (each matrix's mean squared input activations) on the fp32 model and write it
    as a llama.cpp GGUF imatrix, which `llama-quantize --imatrix` and `gemma4-export ... --imatrix` read.

    Examples:
      gemma4-export imatrix --variant tiny-e2b --out tiny-e2b.imatrix.gguf
      gemma4-export imatrix --model-dir ./my-finetune --calibration my-text.txt --out my.imatrix.gguf
    """
    from . import api
    from .progress import RichReporter

    imp = api.imatrix(variant=variant, model_dir=model_dir, out=out_file, calibration=calibration,
                      chunks=calibration_chunks, device=device, adapter=adapter, force=force,
                      reporter=RichReporter(err))
    _line(out, f"imatrix: {imp.entries} matrices, {imp.chunk_count} chunks x {imp.chunk_size} tokens of "
               f"{', '.join(imp.datasets)}; wrote {out_file}", markup=False)


@app.command()
def matrix(
    variants: Annotated[Optional[str], typer.Option(
        "--variants", help="Comma-separated variants (default: every tiny variant).")] = None,
    targets: Annotated[str, typer.Option(
        "--targets", help=f"Comma-separated targets: {', '.join(target_names())}.")] = ",".join(target_names()),
    quants: Annotated[Optional[list[str]], typer.Option(
        "--quants", help="Presets: TARGET:P1,P2 or a bare preset (for the targets that have it). Repeatable. "
                         "Default: each target's default preset ("
                         + ", ".join(f"{n} {get_target(n).default_preset}" for n in target_names()) + ").")] = None,
    device: Annotated[str, typer.Option(
        "--device", help="cpu, cuda or mps: the reference's and every runtime's device; cells a runtime cannot run "
                         "there are skipped.")] = "cpu",
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory: artifacts/, matrix.md, matrix.json, matrix-kld-vs-size.svg, "
                            "manifest.json.")] = Path("matrix-out"),
    windows: Annotated[Optional[int], typer.Option("--windows", help="Held-out windows scored per artifact.")] = None,
    prompts: Annotated[Optional[int], typer.Option("--prompts", help="Chat prompts for greedy generation.")] = None,
    adapter: AdapterOpt = None,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="Stored references: DIR/<variant>/ for each variant (from `gemma4-export reference`); "
                            "the fp32 model is then never loaded.")] = None,
) -> None:
    """Export every variant x target x preset, validate each in its own runtime against one fp32 reference per
    variant, and write a table, a JSON record, a KLD-against-size plot and a manifest of the artifacts.

    Exits 1 when any cell fails or errors (skipped cells do not).

    Examples:
      gemma4-export matrix --out matrix-out
      gemma4-export matrix --variants tiny-31b,tiny-e2b --quants gguf:q4_k_m,q8_0 --quants onnx:int4
      gemma4-export matrix --device cuda --targets gguf,onnx
      gemma4-export matrix --reference references --out matrix-out
    """
    from rich.text import Text

    from . import api
    from .exporter.variants import TINY
    from .progress import RichReporter
    from .validate.matrix_outputs import OUTPUTS, cell_line, matrix_markdown
    from .validate.matrix_request import parse_quants

    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else list(TINY)
    tlist = [t.strip() for t in targets.split(",") if t.strip()]
    style = {"pass": "green", "fail": "bold red", "error": "bold red", "skip": "yellow"}

    def live(cell) -> None:
        _line(out, Text(cell_line(cell), style=style.get(cell.result, "")))

    res = api.matrix(names, tlist, parse_quants(quants, tlist), device=device, out=out_dir, adapter=adapter,
                     reporter=RichReporter(err), on_cell=live, windows=windows, prompts=prompts, reference=reference)
    out.print(matrix_markdown(res), markup=False, highlight=False, soft_wrap=True)  # raw Markdown: logs keep it whole
    for what in OUTPUTS:
        _line(out, f"{what}: {res.path(what)}", markup=False)
    if not res.passed:
        # a Gemma4ExportError with exit code 1: main() prints it as one line
        from .validate.harness import ValidationFailed

        bad = [c.name for c in res.cells if c.result in ("fail", "error")]
        raise ValidationFailed(f"{len(bad)} of {len(res.cells)} cells did not pass: {', '.join(bad)}")


def _click_error_types() -> tuple[type[Exception], ...]:
    """The exception classes of click's usage errors, as typer raises them. Since typer 0.2x, typer vendors its own
    copy of click (typer._click), whose ClickException derives from typer.exceptions.TyperException, not from
    click.ClickException; older typer raises click's own. Both, where present."""
    import importlib

    found: list[type[Exception]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _with_usage_context(e: Exception) -> None:
    """click raises some usage errors without the context that names the command (an option missing its value:
    `gemma4-export gguf --quant`), and shows those as a bare `Error:` line. Find the command from the command line
    and attach its context, so that the error gets its usage line and `Try ... --help` hint like the others."""
    if not hasattr(e, "ctx") or e.ctx is not None:
        return
    try:
        from typer.main import get_command

        group = get_command(app)
        ctx = root = group.make_context("gemma4-export", [], resilient_parsing=True)
        # the root has no option that takes a value, so the first word that is not an option names the command
        name = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        sub = group.get_command(root, name) if name else None
        if sub is not None:
            ctx = sub.make_context(name, [], parent=root, resilient_parsing=True)
        e.ctx, e.cmd = ctx, ctx.command
    except Exception:  # the bare error line is still right
        pass


# The signal that stopped the command, when one of _STOPPING_SIGNALS did: it exits 128 + its number, as the shell
# reports a process killed by it.
_stopped_by: signal.Signals | None = None
_STOPPING_SIGNALS = ("SIGTERM", "SIGHUP")


def _stop(signum, frame) -> None:
    """SIGTERM (kill, a CI job's timeout, a container stopping) and SIGHUP (the terminal closed) unwind the command
    as Ctrl-C does, so every staging file is removed on the way out. A second signal while unwinding is ignored."""
    global _stopped_by
    if _stopped_by is None:
        _stopped_by = signal.Signals(signum)
        raise KeyboardInterrupt


def _stop_on_termination() -> None:
    """Installs _stop for the signals whose handling is still the default (one the caller set is kept)."""
    for name in _STOPPING_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            try:
                signal.signal(sig, _stop)
            except ValueError:  # not the main thread
                return


def _interrupted() -> None:
    what = "interrupted" if _stopped_by is None else f"stopped by {_stopped_by.name}"
    err.print(f"{what}; nothing was written under the final name", highlight=False)
    sys.exit(130 if _stopped_by is None else 128 + _stopped_by)


def main() -> None:
    """The console script. The app runs in click's non-standalone mode so that this function owns every exit: a
    Gemma4ExportError prints one line and exits with its code, a usage error prints click's usage, hint and error
    (exit 2), Ctrl-C exits 130, SIGTERM 143 and SIGHUP 129, each after removing what it had staged."""
    _stop_on_termination()
    try:
        # prog_name: the usage line says gemma4-export also under `python -m gemma4_export.cli`
        rc = app(prog_name="gemma4-export", standalone_mode=False)
    except Gemma4ExportError as e:
        if os.environ.get("GEMMA4_EXPORT_DEBUG"):
            raise
        from rich.text import Text

        _line(err, Text("error: ", style="bold red") + Text(str(e)))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort as e:
        # click turns Ctrl-C (and EOF at a prompt) into Abort; typer's vendored click turns Ctrl-C into Exit(130)
        if isinstance(e.__context__, KeyboardInterrupt):
            _interrupted()
        sys.exit(1)
    except _click_error_types() as e:
        # with no arguments, typer has printed the help already (rich), and the error's own message is empty
        if not (type(e).__name__ == "NoArgsIsHelpError" and not e.format_message().strip()):
            _with_usage_context(e)
            e.show()
        sys.exit(e.exit_code)
    # In non-standalone mode click returns typer.Exit's code instead of raising it (--help and --version: 0), and
    # typer's vendored click turns Ctrl-C into Exit(130), so an interrupted command arrives here as 130.
    if rc == 130:
        _interrupted()
    if isinstance(rc, int) and not isinstance(rc, bool) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
