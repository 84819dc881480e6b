"""The library API: `plan`, `export`, `validate` and `matrix`. The CLI parses arguments and calls these; scripts and
tests call them directly.

    from gemma4_export import api

    p = api.plan("tiny-e2b", "gguf", "q4_k_m")                   # which type each tensor gets, and why
    r = api.export("gguf", "tiny-e2b", "q4_k_m", "out/")         # writes out/tiny-e2b-q4_k_m.gguf (+ .plan.json)
    report = api.validate(r.path)                                # runs it in llama.cpp against fp32 transformers
    print(report.passed, report.logits.kld_mean)

`source` is a registered variant name ("e2b", "tiny-e2b", a hub id) or a checkpoint directory (a `Path`, or a
string naming an existing directory).

`export` is the one export pipeline: it resolves the source, builds the plan, prepares an atomic output (nothing
under the final name until the artifact is whole), times the work and writes the plan beside the artifact; the
target only writes its bytes (`Target.write`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import Staging, atomic_dir, atomic_file
from .errors import Gemma4ExportError
from .exporter.checkpoint import Checkpoint
from .exporter.source import ModelSource
from .exporter.tensors import Role
from .exporter.tokenizer import tokenizer_file
from .progress import Reporter, Silent
from .quant.plan import Plan, build_plan
from .quant.presets import Preset
from .targets.registry import Target, get_target

Source = str | Path | ModelSource


def open_source(source: Source | None = None, *, variant: str | None = None, model_dir: str | Path | None = None,
                need_weights: bool = False, adapter: str | Path | None = None) -> ModelSource:
    """A ModelSource from a variant name, a directory, or an already open source; with a LoRA adapter merged in."""
    if isinstance(source, ModelSource):
        return source
    variant, model_dir = _split_source(source, variant, model_dir)
    return ModelSource.open(variant, model_dir, need_weights=need_weights, adapter=adapter)


def _split_source(source: str | Path | None, variant: str | None, model_dir: str | Path | None
                  ) -> tuple[str | None, str | Path | None]:
    """(variant, model_dir) from a source: a Path is a directory; a string is a registered variant, or else an
    existing directory."""
    if source is None:
        return variant, model_dir
    from .exporter.variants import VARIANTS

    if isinstance(source, Path) or (str(source) not in VARIANTS and Path(source).is_dir()):
        return None, source
    return str(source), None


def plan(source: Source | None = None, target: str = "gguf", preset: str | None = None, *,
         variant: str | None = None, model_dir: str | Path | None = None, overrides: list[str] | None = None,
         ple_type: str | None = None, group_size: int | None = None, adapter: str | Path | None = None,
         target_bpw: float | None = None, max_size: int | None = None, calibrate: bool | None = None,
         imatrix: str | Path | None = None, device: str = "cpu", reporter: Reporter | None = None,
         qat: str = "auto", gptq: bool = True) -> Plan:
    """The per-tensor plan: from the shipped config for a published variant (no weights needed), from the weights
    for a tiny variant or a checkpoint directory (so the plan lists the file's own tensors). With an adapter, the
    tensors it merges into say so. With `target_bpw` or `max_size`, the types are chosen from the checkpoint's
    measured sensitivity to fit that size (quant/sensitivity.py; needs the weights). `qat` (auto, on, off): whether
    tensors found on a QAT checkpoint's 4-bit lattice are written on it (quant/lattice.py; measured on the weights
    when they are at hand)."""
    t = get_target(target)
    sized = target_bpw is not None or max_size is not None
    src = open_source(source, variant=variant, model_dir=model_dir, adapter=adapter, need_weights=sized)
    p = t.preset(preset, group_size)
    try:
        lat = _lattice(src, p, qat, reporter)
        the_plan = build_plan(src.arch, src.tensor_specs(), p, src.name, overrides, ple_type, lattice=lat, qat=qat)
        if sized:
            imp = _importance(src, the_plan, t, calibrate, None, imatrix, None, device, reporter or Silent(), gptq)
            the_plan = _sized_plan(src, the_plan, p, t, overrides, ple_type, imp, target_bpw, max_size, device,
                                   reporter or Silent(), lat, qat)
        return _with_adapter(the_plan, src)
    finally:
        if src.directory is not None:
            src.checkpoint.close()


def tower_plan_of(source: Source | None = None, target: str = "gguf", preset: str | None = None, *,
                  variant: str | None = None, model_dir: str | Path | None = None, tower_type: str | None = None
                  ) -> Plan:
    """The towers' plan that an export to `target` writes (GGUF: the mmproj file), from the shipped config for a
    published variant or from the checkpoint's own tensors."""
    t = get_target(target)
    src = open_source(source, variant=variant, model_dir=model_dir)
    try:
        if tower_type is not None and tower_type.lower() == "none":
            raise Gemma4ExportError("--mmproj none: no towers, so no towers' plan")
        p = tower_plan(src, t, t.preset(preset), True, tower_type or (t.tower_choices[0] if t.tower_choices else None),
                       Silent())
        if p is None:
            raise Gemma4ExportError(f"{src.name} has no vision or audio tower that {t.name} writes")
        return p
    finally:
        if src.directory is not None:
            src.checkpoint.close()


def _lattice(src: ModelSource, p: Preset, qat: str, reporter: Reporter | None):
    """{tensor: LatticeFit} when the preset can write a lattice and the weights are at hand; else None."""
    from .errors import QuantError
    from .quant.plan import check_qat_mode, lattice_preset

    check_qat_mode(qat)
    if qat == "off" or not lattice_preset(p) or src.directory is None:
        if qat == "on" and not lattice_preset(p):
            raise QuantError(f"--qat on: preset {p.name} is not a 4-bit one; use --quant qat (or a 4-bit preset)")
        return None
    from .quant.lattice import measure_checkpoint

    return measure_checkpoint(src.checkpoint, src.tensor_specs(), reporter)


def _sized_plan(src: ModelSource, the_plan: Plan, p: Preset, t: Target, overrides, ple_type, importance,
                target_bpw: float | None, max_size: int | None, device: str, reporter: Reporter, lattice=None,
                qat: str = "auto", towers: bool = True) -> Plan:
    """Rebuild the plan with each traded class's type chosen from the measured sensitivity to fit the size
    (`towers`: whether the artifact holds the towers, whose bytes a --max-size then leaves to the text less)."""
    from .errors import QuantError
    from .quant import sensitivity

    spec = sensitivity.target_spec(t, p)  # the target's candidate types, bytes and quantize-dequantize
    if target_bpw is not None and max_size is not None:
        raise QuantError("--target-bpw and --max-size: give one")
    if target_bpw is not None:
        if not 1.5 <= target_bpw <= 16:
            raise QuantError(f"--target-bpw {target_bpw}: give a value between 1.5 and 16 bits per weight")
        budget, what = int(target_bpw * the_plan.parameters / 8), f"target {target_bpw:g} bits per weight"
    else:
        overhead = sensitivity.overhead_bytes(t, src, the_plan, p, towers)
        budget, what = int(max_size) - overhead, f"max size {max_size / 1e6:.1f} MB"
    copies = sensitivity.stored_copies(t, src) if max_size is not None else None  # bytes on disk count twice
    sens = sensitivity.sensitivity_for(src, importance, device, reporter, spec=spec)
    assigned = sensitivity.mixed_assignments(src, the_plan, sens, budget, what, spec, copies)
    sized = build_plan(src.arch, src.tensor_specs(), p, src.name, overrides, ple_type, assigned=assigned,
                       lattice=lattice, qat=qat)
    sized.sensitivity = {"tokens": sens.tokens, "target_bpw": target_bpw, "max_size": max_size, "target": t.name,
                         "types": list(spec.candidates),
                         "kld": sens.kld, "seconds": sens.meta.get("seconds"), "cached": sens.meta.get("cached", False)}
    return sized


def _with_adapter(p: Plan, src: ModelSource) -> Plan:
    """The plan's reasons name the tensors a LoRA adapter is merged into (in fp32, before quantization)."""
    if src.adapter is None:
        return p
    from dataclasses import replace

    merged = set(src.checkpoint.merged_names)
    p.entries = [replace(e, reason=f"{e.reason}; LoRA adapter merged in fp32 first") if e.name in merged else e
                 for e in p.entries]
    return p


@dataclass
class ExportResult:
    path: Path
    plan: Plan = field(repr=False)
    target: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0
    plan_file: Path | None = None
    # what `validate` takes for this export: the artifact itself, or, in an ONNX directory that holds several
    # presets (`into`), this preset's decoder graph
    validate_as: Path | None = None
    tower_plan: Plan | None = field(default=None, repr=False)  # the towers' plan, when they were exported
    towers: Path | None = None  # the companion tower artifact (GGUF: the mmproj file), when there is one


@dataclass
class ExportJob:
    """What a target's `write` gets: the open checkpoint, the plan, and where to write."""

    source: ModelSource
    checkpoint: Checkpoint
    preset: Preset
    plan: Plan
    path: Path  # the staging file or directory; renamed to the final name when the pipeline finishes
    staging: Staging | None  # for more temporaries beside it (removed at the end)
    reporter: Reporter
    options: dict[str, Any]  # target options (threads, ...)
    seconds: dict[str, float]
    importance: Any = None  # quant.calibrate.Importance: what the quantizers weight their error by, or None
    tower_plan: Plan | None = None  # the towers' plan: written inside the artifact, or beside it (Target.towers_kind)


def export(
    target: str | Target,
    source: Source | None = None,
    preset: str | None = None,
    out: str | Path = ".",
    *,
    variant: str | None = None,
    model_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    ple_type: str | None = None,
    group_size: int | None = None,
    adapter: str | Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    calibrate: bool | None = None,
    calibration: str | Path | None = None,
    imatrix: str | Path | None = None,
    calibration_chunks: int | None = None,
    calibration_device: str = "cpu",
    target_bpw: float | None = None,
    max_size: int | None = None,
    into: str | Path | None = None,
    qat: str = "auto",
    towers: bool = True,
    tower_type: str | None = None,
    gptq: bool = True,
    **options: Any,
) -> ExportResult:
    """Export `source` as `target`'s artifact with `preset` (the target's default when None) into directory `out`;
    with `adapter`, a PEFT LoRA adapter merged into the weights in fp32 as they stream, before quantization.

    Calibration (quant/calibrate.py): by default on when the plan quantizes below 8 bits. The statistics come from
    `imatrix` (a llama.cpp GGUF imatrix file) when given, else from the streamed fp32 model on the shipped
    calibration set or on the text file `calibration` (cached per checkpoint); `calibrate=False` turns it off.
    With our own calibration the quantizers also take GPTQ's error feedback from the inputs' second moments
    (quant.weighted.gptq); `gptq=False` leaves only the importance-weighted rounding, which is exactly what
    llama.cpp's `llama-quantize --imatrix` writes for GGUF.

    `target_bpw` (bits per weight over the text parameters) or `max_size` (bytes of the whole artifact) choose each
    class of tensors' type from its measured sensitivity to fit that size, among the target's types (GGUF's, MLX's
    2- to 8-bit affine groups, ONNX's INT4 / INT8 / FP16); the artifact's name says the size it was made for.

    `into` (ONNX): an existing ONNX directory of the same checkpoint that this preset's graphs join, as several
    dtypes live in one onnx-community repository; its other presets are kept, and `force` replaces this preset's.

    `qat` (auto, on, off): tensors of a quantization-aware-trained checkpoint found on a 4-bit lattice are written
    on it, with the trained steps and integers (quant/lattice.py), in the `qat` preset and the 4-bit ones.

    `towers`: the vision and audio towers are exported wherever the checkpoint has them and the target can write
    them (GGUF: the projector file `mmproj-<name>-<type>.gguf` beside the text GGUF, one per checkpoint, reused by
    its other quants); `tower_type` chooses their type (GGUF: f16, q8_0 or f32); `towers=False` (--text-only,
    --mmproj none) leaves them out."""
    t = get_target(target)
    t.require()
    reporter = reporter or Silent()
    t0 = time.perf_counter()
    p = t.preset(preset, group_size)  # an unknown preset fails before any checkpoint is opened
    src = open_source(source, variant=variant, model_dir=model_dir, need_weights=True, adapter=adapter)
    tokenizer_file(src.directory)  # before any work: the artifact, the calibration and the validation all need it
    ck = src.checkpoint
    try:
        lat = _lattice(src, p, qat, reporter)
        the_plan = build_plan(src.arch, src.tensor_specs(), p, src.name, overrides, ple_type, lattice=lat, qat=qat)
        tplan = tower_plan(src, t, p, towers, tower_type, reporter)
        sized = target_bpw is not None or max_size is not None
        name = t.artifact_name(src.name, p, group_size)
        if sized:
            label = f"{target_bpw:g}bpw" if target_bpw is not None else f"{max_size / 1e6:g}MB"
            stem, dot, ext = name.rpartition(".") if t.artifact_kind == "file" else (name, "", "")
            name = f"{stem}-{label}{dot}{ext}"
        final = Path(out) / name
        if into is not None:
            if t.name != "onnx":
                raise Gemma4ExportError(f"--into is for ONNX directories, not {t.name}")
            from .targets.onnx import check_into

            final = Path(into)
            check_into(final, p.name, src.provenance().get("source_digest"), force)
            options = {**options, "into": final}
        elif not force and final.exists():
            from .atomic import prepare_output

            prepare_output(final, force, 0)  # an existing artifact is refused before any calibration work
        tower_final = _tower_final(t, src, tplan, Path(out), force, reporter)
        t1 = time.perf_counter()
        importance = _importance(src, the_plan, t, calibrate, calibration, imatrix, calibration_chunks,
                                 calibration_device, reporter, gptq)
        seconds: dict[str, float] = {}
        if importance is not None:
            seconds["calibrate"] = time.perf_counter() - t1
        if sized:
            t1 = time.perf_counter()
            the_plan = _sized_plan(src, the_plan, p, t, overrides, ple_type, importance, target_bpw, max_size,
                                   calibration_device, reporter, lat, qat, towers=tplan is not None)
            seconds["sensitivity"] = time.perf_counter() - t1
        the_plan = _with_adapter(the_plan, src)
        if importance is not None:
            the_plan.calibration = describe_importance(importance)
        result = ExportResult(final, the_plan, t.name, seconds, tower_plan=tplan)
        job = ExportJob(src, ck, p, the_plan, final, None, reporter, options, result.seconds, importance,
                        tplan if t.towers_kind == "inside" else None)
        atomic = atomic_file if t.artifact_kind == "file" else atomic_dir
        with atomic(final, force or into is not None, t.need_bytes(job)) as st:
            job.path, job.staging = st.path, st
            if into is not None:
                from .targets.onnx import link_other_presets

                link_other_presets(final, st.path, p.name)
            t.write(job)
        if tower_final is not None:
            job.tower_plan = tplan
            with atomic_file(tower_final, True, tplan.total_bytes + (1 << 20)) as st:
                t.write_towers(job, st.path)
            write_plan(tower_final, tplan)
        if tplan is not None and t.towers_kind == "file":
            result.towers = Path(out) / t.tower_artifact_name(src.name, tplan)
    finally:
        ck.close()
    result.bytes = artifact_bytes(final)
    result.plan_file = write_plan(final, the_plan, p.name if into is not None else None)
    result.validate_as = final
    if into is not None:
        from .targets.onnx import DECODER, graph_files

        result.validate_as = final / graph_files(p.name)[DECODER]
    result.seconds["total"] = time.perf_counter() - t0
    return result


def tower_plan(src: ModelSource, t: Target, p: Preset, towers: bool, choice: str | None, reporter: Reporter
               ) -> Plan | None:
    """The towers' plan, or None when they are not exported: asked not to, none in the checkpoint, a target that
    does not write them, or (without an explicit choice) a tower layout the target cannot write yet, said in a
    note."""
    from .quant.plan import build_tower_plan

    if choice is not None and choice.lower() == "none":
        return None
    if not towers:
        if choice is not None:
            raise Gemma4ExportError("a tower type was given with the towers left out (--text-only): choose one")
        return None
    specs = [s for s in src.tensor_specs() if s.role == Role.TOWER]
    if not specs or not t.towers_kind:
        if choice is not None:
            raise Gemma4ExportError(f"no towers to write: {src.name} has none" if not specs
                                    else f"{t.name} does not write the towers")
        return None
    policy = t.tower_policy(choice, p)
    try:
        t.check_towers(src.config)
    except Gemma4ExportError as e:
        if choice is not None:
            raise
        reporter.note(f"towers not exported: {e}")
        return None
    if note := t.tower_note(src.config):
        reporter.note(note)
    return build_tower_plan(specs, policy, t.name, src.name)


def _tower_final(t: Target, src: ModelSource, tplan: Plan | None, out: Path, force: bool,
                 reporter: Reporter) -> Path | None:
    """Where the companion tower artifact goes, or None when there is nothing to write: no companion, or the same
    weights' projector is already there (one per checkpoint, shared by its quants: kept, unless --force). A file of
    other weights under that name is refused without --force."""
    if tplan is None or t.towers_kind != "file":
        return None
    final = out / t.tower_artifact_name(src.name, tplan)
    if final.exists() and not force:
        from .targets.gguf_mmproj import mmproj_digest

        try:
            same = mmproj_digest(final) == src.provenance().get("source_digest")
        except Gemma4ExportError:
            same = False
        if not same:
            raise Gemma4ExportError(f"{final} exists and is not this checkpoint's projector (pass --force to "
                                    "replace it)")
        reporter.note(f"kept {final.name}: this checkpoint's projector is already there")
        return None
    return final


def needs_calibration(plan: Plan, target: Target) -> bool:
    """The default: calibrate when the plan quantizes some tensor below 8 bits per weight."""
    return any(not target.types[e.type].is_float and target.types[e.type].bits_per_weight < 8 for e in plan.kept)


def _importance(src: ModelSource, the_plan: Plan, t: Target, calibrate: bool | None, calibration, imatrix,
                chunks: int | None, device: str, reporter: Reporter, gptq: bool = True):
    from .errors import QuantError
    from .quant import calibrate as cal

    if calibrate is False:
        if imatrix is not None or calibration is not None:
            raise QuantError("--no-calibrate with --imatrix or --calibration: choose one")
        needing = sorted({e.type for e in the_plan.kept if e.type in cal.NEEDS_CALIBRATION})
        if needing:
            raise QuantError(f"{', '.join(needing)} is only made with calibration (at 2 bits, plain rounding "
                             "loses too much); drop --no-calibrate")
        return None
    if calibrate is None and imatrix is None and calibration is None and not needs_calibration(the_plan, t):
        return None
    if imatrix is not None:
        imp = cal.read_imatrix(imatrix)
        cal.check_matches(imp, src)
        if gptq:
            reporter.note("--imatrix: an imatrix file holds each input channel's mean square only, not the second "
                          "moments GPTQ's error feedback needs: importance-weighted rounding alone")
        return imp
    return cal.importance_for(src, calibration, chunks=chunks, device=device,
                              reporter=reporter, hessians=gptq)


def describe_importance(imp) -> dict[str, Any]:
    """What the plan file records about the calibration."""
    return {"datasets": imp.datasets, "chunks": imp.chunk_count, "chunk_size": imp.chunk_size,
            "entries": imp.entries, "imatrix": imp.path.name if imp.path else None,
            **({"gptq": imp.describe_hessians()} if imp.hessians else {}), **imp.meta}


def artifact_bytes(artifact: Path) -> int:
    """Size on disk: the file, or every file of an artifact directory."""
    if artifact.is_file():
        return artifact.stat().st_size
    return sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())


def plan_path(artifact: Path, preset: str | None = None) -> Path:
    """Where an artifact's plan is written: beside it, never inside an artifact directory (named by its preset too
    for a directory that holds several, `into`)."""
    return artifact.parent / f"{artifact.name}{'.' + preset if preset else ''}.plan.json"


def write_plan(artifact: Path, p: Plan, preset: str | None = None) -> Path:
    from .atomic import write_text

    path = plan_path(artifact, preset)
    write_text(path, json.dumps(p.to_json(), indent=2) + "\n")
    return path


def validate(artifact: str | Path, source: Source | None = None, *, variant: str | None = None,
             model_dir: str | Path | None = None, device: str = "cpu", reporter: Reporter | None = None,
             adapter: str | Path | None = None, **kwargs: Any):
    """Run an artifact in its own runtime against transformers in fp32; returns the report (written beside it)."""
    from .validate.harness import validate_artifact

    if isinstance(source, ModelSource):
        variant, model_dir = (source.variant.name if source.variant and not source.directory else None,
                              source.directory)
    else:
        variant, model_dir = _split_source(source, variant, model_dir)
    return validate_artifact(artifact, variant, model_dir, device, reporter, adapter=adapter, **kwargs)


def reference(source: Source | None = None, *, variant: str | None = None, model_dir: str | Path | None = None,
              out: str | Path | None = None, device: str = "cpu", adapter: str | Path | None = None,
              windows: int | None = None, prompts: int | None = None, new_tokens: int = 64,
              reporter: Reporter | None = None, force: bool = False, keep_bytes: int | None = None):
    """Compute the fp32 reference results of a checkpoint with the streamed model (one decoder layer in memory at a
    time); with `out`, store them there (a directory `validate(reference=...)` and `matrix(reference=...)` read).
    Returns a validate.refdata.ReferenceData."""
    from .validate.harness import EvalSpec
    from .validate.refdata import ReferenceData

    if isinstance(source, ModelSource):
        src = source
    else:
        variant, model_dir = _split_source(source, variant, model_dir)
        src = ModelSource.open(variant, model_dir, need_weights=True, adapter=adapter)
    if out is not None and Path(out).exists() and not force:
        raise Gemma4ExportError(f"{out} exists (pass --force to replace it)")
    spec = EvalSpec.for_arch(src.arch, windows, prompts, new_tokens)
    data = ReferenceData.compute(src, spec, device, reporter, keep_bytes)
    if out is not None:
        data.save(out, tokenizer_from=src.checkpoint.dir, force=force)
    return data


def imatrix(source: Source | None = None, *, variant: str | None = None, model_dir: str | Path | None = None,
            out: str | Path | None = None, calibration: str | Path | None = None, chunks: int | None = None,
            device: str = "cpu", adapter: str | Path | None = None, force: bool = False,
            reporter: Reporter | None = None):
    """The importance statistics of a checkpoint (quant.calibrate.Importance), measured on the streamed fp32 model
    (or read from the cache); with `out`, also written there as a llama.cpp GGUF imatrix."""
    from .atomic import prepare_output
    from .quant import calibrate as cal

    if out is not None:
        prepare_output(out, force, 0)
    src = open_source(source, variant=variant, model_dir=model_dir, need_weights=True, adapter=adapter)
    imp = cal.importance_for(src, calibration, chunks=chunks, device=device, reporter=reporter)
    if out is not None:
        cal.write_imatrix(imp, out)
    return imp


def matrix(variants: list[str], targets: list[str], quants: dict[str, list[str]] | None = None, *,
           device: str = "cpu", out: str | Path = "matrix-out", **kwargs: Any):
    """Export and validate every variant x target x preset; see validate.matrix.run_matrix."""
    from .validate.matrix import run_matrix

    return run_matrix(variants, targets, quants, device, Path(out), **kwargs)
