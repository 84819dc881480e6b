"""Validation: run an artifact in its own runtime and compare it with transformers in float32 on the same tokens.

The harness is the same for every target: a runner gives logits for a token sequence, greedy tokens through its own
decode path, and (where the runtime has one) its own tokenization. Metrics, thresholds and the report are shared.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import Gemma4ExportError
from ..exporter.arch import Gemma4Arch
from ..exporter.source import ModelSource
from ..progress import Reporter, Silent
from .metrics import GenerationMetrics, LogitMetrics, TokenStats, compare_generations, summarize
from .refdata import ReferenceData, ReferenceMismatch
from .texts import PROMPTS
from .thresholds import Thresholds, thresholds_for


class Runner(Protocol):
    name: str

    def describe(self) -> dict: ...

    def logits(self, ids: list[int]) -> np.ndarray: ...

    def greedy(self, ids: list[int], n: int) -> list[int]: ...


class ValidationFailed(Gemma4ExportError):
    exit_code = 1


@dataclass
class EvalSpec:
    window: int
    windows: int
    prompts: int = len(PROMPTS)
    new_tokens: int = 64

    @classmethod
    def for_arch(cls, a: Gemma4Arch, windows: int | None = None, prompts: int | None = None,
                 new_tokens: int = 64) -> EvalSpec:
        # Long enough to run well past the sliding window (and so through the KV-shared layers' donor caches).
        window = min(max(256, 2 * a.sliding_window), a.max_position_embeddings)
        return cls(window, windows or (8 if window <= 256 else 4), prompts or len(PROMPTS), new_tokens)


@dataclass
class Report:
    artifact: str
    target: str
    preset: str
    model: str
    artifact_bytes: int
    bits_per_weight: float | None
    reference: dict
    runtime: dict
    spec: dict
    logits: LogitMetrics | None = None
    generation: GenerationMetrics | None = None
    tokenizer: dict | None = None
    thresholds: Thresholds | None = None
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)  # a runtime's own checks, e.g. KV cache consistency
    device: str = "cpu"  # as requested; `reference` and `runtime` say what actually ran

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def to_markdown(self) -> str:
        lg, gm = self.logits, self.generation
        rows = [
            ("artifact", f"`{Path(self.artifact).name}` ({self.artifact_bytes:,} bytes"
                         + (f", {self.bits_per_weight:.2f} bpw)" if self.bits_per_weight else ")")),
            ("model", self.model), ("target / preset", f"{self.target} / {self.preset}"),
            ("device requested", self.device),
            ("reference", ", ".join(f"{k}={v}" for k, v in self.reference.items())),
            ("runtime", ", ".join(f"{k}={v}" for k, v in self.runtime.items())),
        ]
        if lg:
            rows += [
                ("scored tokens", f"{lg.tokens} ({self.spec['windows']} windows of {self.spec['window']})"),
                ("KLD mean / p99 / p99.9 / max", f"{lg.kld_mean:.6f} / {lg.kld_p99:.6f} / {lg.kld_p999:.6f} / "
                                                 f"{lg.kld_max:.6f}"),
                ("top-1 agreement", f"{lg.top1_agreement:.4f}"),
                ("RMS Δp (true token)", f"{lg.rms_dp:.5f}"),
                ("PPL reference / artifact / ratio", f"{lg.ppl_ref:.4f} / {lg.ppl_artifact:.4f} / {lg.ppl_ratio:.5f}"),
            ]
            if lg.max_logit_diff is not None:
                rows.append(("max abs logit difference", f"{lg.max_logit_diff:.2e}"))
        if gm:
            rows += [("greedy generation", f"{gm.prompts} prompts x {gm.new_tokens} tokens: exact match "
                                           f"{gm.exact_match_rate:.3f}, mean first divergence "
                                           f"{gm.mean_first_divergence:.1f}"
                                           + (f", near-tie divergences {gm.near_ties}" if gm.near_ties else ""))]
        if self.tokenizer:
            rows.append(("tokenizer parity", f"{self.tokenizer['texts'] - len(self.tokenizer['mismatches'])}/"
                                             f"{self.tokenizer['texts']} texts identical"))
        for name, c in self.checks.items():
            rows.append((name.replace("_", " "), c.get("summary", "") + (" (ok)" if c["passed"] else " (FAILED)")))
        rows.append(("result", "PASS" if self.passed else "FAIL"))
        out = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
        if self.failures:
            out += ["", "Failures:", ""] + [f"- {f}" for f in self.failures]
        if self.thresholds:
            t = self.thresholds
            out += ["", f"Thresholds ({self.target} {self.preset}): KLD mean <= {t.kld_mean}, KLD p99.9 <= "
                        f"{t.kld_p999}, top-1 >= {t.top1}, PPL ratio <= {t.ppl_ratio}, greedy exact >= "
                        f"{t.gen_exact}, mean first divergence >= {t.gen_first_div}"
                        + (f", max logit diff <= {t.max_logit_diff}" if t.max_logit_diff is not None else "")]
        return "# Validation report\n\n" + "\n".join(out) + "\n"

    def write(self, directory: Path | None = None) -> tuple[Path, Path]:
        base = Path(self.artifact)
        d = directory or base.parent  # beside the artifact, never inside an artifact directory
        stem = base.name
        if base.parent.name == "onnx" and (base.parent.parent / "inference_config.json").is_file():
            # one preset's graph of an ONNX directory: beside the directory, named by the preset
            art = base.parent.parent
            d, stem = directory or art.parent, f"{art.name}.{self.preset}"
        j, m = d / f"{stem}.validation.json", d / f"{stem}.validation.md"
        j.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        m.write_text(self.to_markdown())
        return j, m


def check(report: Report, t: Thresholds) -> list[str]:
    f = []
    lg, gm, tk = report.logits, report.generation, report.tokenizer
    if tk and tk["mismatches"]:
        for mm in tk["mismatches"]:
            f.append(f"tokenizer differs on {mm['text']!r}: reference {mm['reference'][:12]}..., "
                     f"runtime {mm['runtime'][:12]}...")
    if lg:
        if lg.kld_mean > t.kld_mean:
            f.append(f"mean KLD {lg.kld_mean:.6f} > {t.kld_mean}")
        if lg.kld_p999 > t.kld_p999:
            f.append(f"p99.9 KLD {lg.kld_p999:.6f} > {t.kld_p999}")
        if lg.top1_agreement < t.top1:
            f.append(f"top-1 agreement {lg.top1_agreement:.4f} < {t.top1}")
        if lg.ppl_ratio > t.ppl_ratio:
            f.append(f"PPL ratio {lg.ppl_ratio:.5f} > {t.ppl_ratio}")
        if t.max_logit_diff is not None and (lg.max_logit_diff is None or lg.max_logit_diff > t.max_logit_diff):
            f.append(f"max |logit difference| {lg.max_logit_diff} > {t.max_logit_diff}")
    for name, c in report.checks.items():
        if not c["passed"]:
            f.append(f"{name.replace('_', ' ')} check failed: {c.get('summary', '')}")
    if gm:  # a divergence on a near-tie of the reference is not a defect (metrics.NEAR_TIE)
        if gm.agreement_rate < t.gen_exact:
            f.append(f"greedy agreement {gm.agreement_rate:.3f} < {t.gen_exact} (exact matches "
                     f"{gm.exact_match_rate:.3f}, near-tie divergences {gm.near_ties})")
        if gm.mean_first_divergence_ties_ok < t.gen_first_div:
            f.append(f"mean first divergence {gm.mean_first_divergence_ties_ok:.1f} < {t.gen_first_div}")
    return f


def run_validation(runner: Runner, ref: ReferenceData, reporter: Reporter, tokenize: bool = True
                   ) -> tuple[LogitMetrics, GenerationMetrics, dict | None, dict[str, float]]:
    """Compare a runner with reference results on the reference's own token ids."""
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    tok_report = None
    if tokenize and hasattr(runner, "tokenize"):
        mismatches = []
        for text, want in ref.parity:
            got = runner.tokenize(text)
            if got != want:
                mismatches.append({"text": text[:80], "reference": want, "runtime": got})
        tok_report = {"texts": len(ref.parity), "mismatches": mismatches}
    secs["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats = TokenStats.empty()
    max_diff = 0.0
    with reporter.task("compare logits", len(ref.windows), unit="windows") as task:
        for w, win in enumerate(ref.windows):
            a = runner.logits(win.ids)
            max_diff = max(max_diff, stats.add_compact(ref.compact(w), a[win.half:-1],
                                                       np.asarray(win.ids[win.half + 1:])))
            del a
            task.advance(1)
    lm = summarize(stats, max_diff)
    secs["logits"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    refs, arts, texts, choices = [], [], [], []
    eos = ref.eos_ids
    with reporter.task("greedy generation", len(ref.generations), unit="prompts") as task:
        for g in ref.generations:
            a = _until_eos(runner.greedy(g.ids, ref.spec["new_tokens"]), eos)
            refs.append(g.tokens)
            arts.append(a)
            choices.append((g.margins, g.second))
            texts.append((g.prompt, ref.decode(g.tokens), ref.decode(a)))
            task.advance(1)
    gm = compare_generations(refs, arts, ref.spec["new_tokens"], texts, choices)
    secs["generation"] = time.perf_counter() - t0
    return lm, gm, tok_report, secs


def _until_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


@dataclass
class ArtifactInfo:
    preset: str
    metadata: dict


def _source_of(meta: dict, artifact: Path) -> tuple[str | None, Path | None]:
    """The checkpoint an artifact was exported from, as its metadata records it: a registered variant's name or hub
    id. Artifacts record no local paths, so one exported from a local directory needs --model-dir."""
    from ..exporter.variants import VARIANTS, get_variant

    name = meta.get("base") or meta.get("general.name")  # with an adapter, the base it was merged into
    if name in VARIANTS:
        return name, None
    hub = meta.get("hub_id")
    if hub:
        try:
            return get_variant(hub).name, None
        except Gemma4ExportError:
            pass
    raise Gemma4ExportError(f"{artifact}: exported from {name or 'an unregistered checkpoint'}, which is not a "
                            "registered variant; pass --model-dir with that checkpoint's directory (or --variant)")


def validate_artifact(
    artifact: str | Path,
    variant: str | None = None,
    model_dir: str | Path | None = None,
    device: str = "cpu",
    reporter: Reporter | None = None,
    windows: int | None = None,
    prompts: int | None = None,
    new_tokens: int = 64,
    write: bool = True,
    reference: ReferenceData | str | Path | None = None,
    adapter: str | Path | None = None,
    towers: bool | str | Path = True,
    accumulate: str = "native",
) -> Report:
    """Validate one artifact against reference results: `reference` (ReferenceData, or a directory written by
    `gemma4-export reference`) of the artifact's weights, or else computed here by the streamed fp32 model.

    `accumulate="float32"` (MLX on a CPU only) runs mlx's quantized matmuls with float32 sums, as its Metal kernels
    do, where its CPU kernels sum in bfloat16 (validate/mlxrt.py); the report's runtime says so.

    The towers are checked too where the artifact has them (GGUF: the projector beside it, or the file `towers`
    names): their embeddings and media-prompted generations against transformers' (validate/towers.py). That needs
    the checkpoint: a stored `reference` without `variant` / `model_dir` skips them; `towers=False` always does."""
    from ..api import artifact_bytes
    from ..targets.registry import detect_target

    reporter = reporter or Silent()
    artifact = Path(artifact)
    tgt = detect_target(artifact)
    target = tgt.name
    runner_options = {} if accumulate == "native" else {"accumulate": accumulate}
    if runner_options and target != "mlx":
        raise Gemma4ExportError(f"--accumulate {accumulate}: for MLX artifacts (mlx's CPU kernels), not {target}")
    t_all = time.perf_counter()
    info = tgt.artifact_info(artifact)
    preset = info.preset
    recorded = info.metadata.get("adapter")
    digest = info.metadata.get("source_digest")
    t0 = time.perf_counter()
    if reference is not None:
        ref = reference if isinstance(reference, ReferenceData) else ReferenceData.load(reference)
        ref.check_source(info.metadata.get("base") or info.metadata.get("general.name"), digest, artifact.name)
        if recorded and ref.meta.get("adapter") != recorded:
            raise ReferenceMismatch(f"{artifact.name} was exported with the LoRA adapter {recorded}; the reference "
                                    f"is of {ref.meta.get('adapter') or 'the base model alone'}")
        spec = EvalSpec(**ref.spec)
        asked = {"windows": windows, "prompts": prompts}
        if any(v is not None and v != ref.spec[k] for k, v in asked.items()):
            raise ReferenceMismatch(f"the stored reference holds {ref.spec['windows']} windows and "
                                    f"{ref.spec['prompts']} prompts; it cannot answer for {asked}")
        if new_tokens != 64 and new_tokens != ref.spec["new_tokens"]:
            raise ReferenceMismatch(f"the stored reference generated {ref.spec['new_tokens']} tokens per prompt, "
                                    f"not {new_tokens}")
        model_name, params = ref.meta["source"], ref.meta.get("text_parameters")
    else:
        if variant is None and model_dir is None:
            variant, model_dir = _source_of(info.metadata, artifact)
        if recorded and adapter is None:
            raise Gemma4ExportError(f"{artifact}: exported with the LoRA adapter {recorded}; pass --adapter with it, "
                                    "so that the reference is the merged model")
        src = ModelSource.open(variant, model_dir, need_weights=True, adapter=adapter)
        if digest and digest != src.digest:
            raise ReferenceMismatch(f"{artifact.name} was exported from other weights than {src.name} "
                                    f"({digest[:19]}... against {src.digest[:19]}...): give the checkpoint it came "
                                    "from")
        spec = EvalSpec.for_arch(src.arch, windows, prompts, new_tokens)
        ref = ReferenceData.compute(src, spec, device, reporter)
        model_name = src.name
        from ..quant.plan import text_parameters

        params = text_parameters(src.arch)
    ref_s = time.perf_counter() - t0
    t = thresholds_for(target, preset)

    t0 = time.perf_counter()
    runner = tgt.make_runner(artifact, spec, device, preset, **runner_options)
    load_s = time.perf_counter() - t0
    lm, gm, tok, secs = run_validation(runner, ref, reporter)
    from ..quant.plan import bits_per_weight

    size = artifact_bytes(artifact)
    rep = Report(
        artifact=str(artifact), target=target, preset=preset, model=model_name,
        artifact_bytes=size, bits_per_weight=bits_per_weight(size, params) if params else None,
        reference=ref.describe(), runtime=runner.describe(), spec=asdict(spec), logits=lm, generation=gm,
        tokenizer=tok, thresholds=t, seconds={"reference": ref_s, "load": load_s, **secs}, device=device,
    )
    t0 = time.perf_counter()
    prompt_ids = [g.ids for g in ref.generations[:2]]
    rep.checks = tgt.runtime_checks(runner, prompt_ids, min(spec.new_tokens, 32))
    rep.seconds["runtime_checks"] = time.perf_counter() - t0
    if hasattr(runner, "close"):
        runner.close()
    runner = None
    if towers is not False and (reference is None or variant is not None or model_dir is not None):
        t0 = time.perf_counter()
        # the stored reference's digest covers its LoRA adapter's files too: the checkpoint is opened with it
        tsrc = src if reference is None else ModelSource.open(variant, model_dir, need_weights=True, adapter=adapter)
        try:
            if reference is not None and ref.meta.get("source_digest") not in (None, tsrc.digest):
                hint = (f"; the reference includes the LoRA adapter {ref.meta['adapter']}: give it too"
                        if ref.meta.get("adapter") and adapter is None else "")
                raise ReferenceMismatch(f"{tsrc.name} is not the checkpoint of the stored reference (of "
                                        f"{ref.meta['source']}): its towers cannot be checked against that "
                                        f"artifact{hint}")
            rep.checks.update(_tower_checks(tgt, artifact, None if towers is True else Path(towers), device, tsrc, t))
        finally:
            if reference is not None and tsrc.directory is not None:
                tsrc.checkpoint.close()
        rep.seconds["towers"] = time.perf_counter() - t0
    rep.failures = check(rep, t)
    rep.seconds["total"] = time.perf_counter() - t_all
    if write:
        rep.write()
    return rep


# The whole multimodal model is loaded in fp32 for the media-prompted generations when it takes at most this share
# of the machine's memory (the tiny checkpoints); above it (a real E2B needs about 20 GB) the reference's text model
# is streamed one layer at a time beside the towers alone (towers.StreamedMediaReference).
WHOLE_MODEL_MEMORY_SHARE = 0.25


def _tower_checks(tgt, artifact: Path, towers: Path | None, device: str, src: ModelSource, t: Thresholds
                  ) -> dict[str, dict]:
    from .towers import TOWER_LIMITS, tower_checks

    if not any(s.role.value == "tower" for s in src.tensor_specs()):
        return {}
    from ..targets.registry import TowersNotChecked

    try:
        runner = tgt.tower_runner(artifact, towers, device, src)
    except TowersNotChecked as e:
        return {"towers": {"passed": True, "summary": f"not run: {e}"}}
    if runner is None:
        return {}
    try:
        params = sum(s.numel for s in src.tensor_specs())
        whole = params * 4 <= WHOLE_MODEL_MEMORY_SHARE * _memory_bytes()
        # a preset whose text generations must all be identical (f32) needs the media-prompted ones identical too
        # (or parted at a near-tie); through a quantized text model one prompt's divergence says little, so it is
        # reported, and the text prompts gate the text model
        checks = tower_checks(runner, src.checkpoint.dir, TOWER_LIMITS[runner.limits], whole=whole,
                              gen_exact=t.gen_exact >= 1)
        if not whole:
            for kind in ("image", "audio"):
                if f"{kind}_generation" in checks:
                    checks[f"{kind}_generation"]["summary"] += (
                        f" (reference streamed: the whole model in fp32, {params * 4 / 1e9:.1f} GB, is over a "
                        "quarter of this machine's memory)")
        return checks
    finally:
        runner.close()


def _memory_bytes() -> int:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30
