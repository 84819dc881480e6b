"""The target registry: one small declarative class per artifact format, and the only place that knows which formats
exist.

A target declares its name, its storage types and default preset (its presets live in quant/presets.py), how its
artifact is named and recognised, how it writes its bytes (`write`, called by the one export pipeline in
gemma4_export.api), its runtime runner, why it cannot run on a platform or device, and its tensor size limits. The
CLI's help and defaults, the plan, the matrix, the validation harness and the plot read these; nothing outside this
file branches on a target's name.

Adding a format: a module with a `Target` subclass decorated with `@register`, and its module name in
`TARGET_MODULES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import Gemma4ExportError

if TYPE_CHECKING:
    from ..quant.presets import Preset
    from ..quant.types import StorageType
    from ..validate.harness import ArtifactInfo, Runner

# The modules that define targets, in the order they are listed (CLI help, matrix columns, plot legend).
TARGET_MODULES = ("gguf", "mlx", "onnx")
DEVICES: tuple[str, ...] = ("cpu", "cuda", "mps")

_REGISTRY: dict[str, Target] = {}


@dataclass(frozen=True)
class Platform:
    """Facts about this machine that decide which cells run: torch's devices, and what each target's `probe` found
    (None: its runtime is not importable here)."""

    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, arm64, ...
    torch_cuda: bool = False
    torch_mps: bool = False
    runtimes: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine in ("arm64", "aarch64")

    def runtime(self, target: str) -> dict[str, Any] | None:
        return self.runtimes.get(target)


class TowersNotChecked(Gemma4ExportError):
    """An artifact's towers cannot be run here (their runtime is missing): the report says so."""


class Target:
    """What every target declares. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    runtime_name: ClassVar[str]  # what runs its artifacts, in words
    extra: ClassVar[str]  # the pip extra that installs its dependencies
    types: ClassVar[dict[str, StorageType]]
    default_preset: ClassVar[str]
    artifact_kind: ClassVar[str]  # "file" or "directory"
    color: ClassVar[str]  # its series in the KLD-against-size plot
    max_tensor_bytes: ClassVar[int | None] = None  # the largest single tensor its runtime can hold
    max_tensor_reason: ClassVar[str] = ""
    group_sizes: ClassVar[tuple[int, ...]] = ()  # quantization groups a user may choose (--group-size)
    default_group_size: ClassVar[int | None] = None
    devices_help: ClassVar[str] = "cpu"
    # the type a QAT checkpoint's 4-bit lattice is written in (quant/lattice.py), and how, in words
    lattice_type: ClassVar[str] = ""
    lattice_form: ClassVar[str] = ""

    # ---- presets ---------------------------------------------------------------------------------------------
    @property
    def presets(self) -> list[str]:
        from ..quant.presets import presets_of

        return presets_of(self.name)

    def preset(self, name: str | None = None, group_size: int | None = None) -> Preset:
        from ..quant.rules import get_preset

        return get_preset(name or self.default_preset, self.name, group_size)

    # ---- export ----------------------------------------------------------------------------------------------
    def require(self) -> None:
        """Raise a clear error when what the export needs is not installed."""

    def artifact_name(self, source: str, preset: Preset, group_size: int | None = None) -> str:
        raise NotImplementedError

    def small_type(self, preset: Preset) -> StorageType:
        """What a tensor over `max_tensor_bytes` becomes (targets that declare a limit)."""
        raise NotImplementedError

    def overhead_bytes(self, source: Any, plan: Any) -> int:
        """Bytes of the artifact besides its tensor data (headers, metadata, tokenizer): what a --max-size budget
        leaves out for the tensors."""
        return 0

    def need_bytes(self, job: Any) -> int:
        """Disk space the export needs while it runs (the final artifact and any staging)."""
        return job.plan.total_bytes + (64 << 20)

    def write(self, job: Any) -> None:
        """Write the artifact's bytes into `job.path` (a file or a directory, per `artifact_kind`)."""
        raise NotImplementedError

    # ---- towers -----------------------------------------------------------------------------------------------
    # How the vision / audio towers are exported: "file" (a companion artifact beside the text one: llama.cpp's
    # mmproj GGUF), "inside" (in the same directory, written by `write` when job.tower_plan is set), or "" (not
    # exported by this target).
    towers_kind: ClassVar[str] = ""
    tower_choices: ClassVar[tuple[str, ...]] = ()  # what the user may choose for the towers' type

    def tower_policy(self, choice: str | None, preset: Preset):
        """The quant.rules.TowerPolicy for the user's choice (None: the target's default), beside `preset`."""
        raise NotImplementedError

    def check_towers(self, config: dict) -> None:
        """Raise a clear error when this checkpoint's towers cannot be written by this target."""

    def tower_note(self, config: dict) -> str | None:
        """What a user should know about where the written towers run (a consumer's limit), or None."""
        return None

    def tower_artifact_name(self, source: str, tower_plan) -> str:
        raise NotImplementedError

    def write_towers(self, job, path: Path) -> None:
        """Write the companion tower artifact (towers_kind "file") to `path`, from job.tower_plan."""
        raise NotImplementedError

    def tower_runner(self, artifact: Path, towers: Path | None, device: str, src):
        """A runner of this target's towers for validate.towers.tower_checks (`src`: the checkpoint's
        ModelSource), None when the artifact has none; TowersNotChecked when it has them but they cannot be run
        here."""
        return None

    # ---- artifacts and their runtime ------------------------------------------------------------------------
    def recognises(self, path: Path) -> bool:
        raise NotImplementedError

    def artifact_info(self, path: Path) -> ArtifactInfo:
        """Preset and provenance read from the artifact itself; raises on a malformed or foreign one."""
        raise NotImplementedError

    def make_runner(self, path: Path, spec: Any, device: str, preset: str) -> Runner:
        raise NotImplementedError

    def runtime_checks(self, runner: Runner, prompt_ids: list[list[int]], n: int) -> dict[str, dict]:
        """A runtime's own checks beyond the shared metrics: {name: {"passed": bool, "summary": str}}."""
        return {}

    # ---- platforms -------------------------------------------------------------------------------------------
    def probe(self) -> dict[str, Any] | None:
        """What this machine's runtime offers, or None when it is not importable."""
        raise NotImplementedError

    def skip_reason(self, device: str, platform: Platform) -> str | None:
        """Why this target's artifacts cannot be validated on `device` here, or None when they can."""
        raise NotImplementedError

    def backend(self, device: str) -> str:
        """What runs an artifact on a device, in words (the report records what actually ran)."""
        raise NotImplementedError

    def not_installed(self) -> str:
        return f"{self.runtime_name} is not installed (pip install 'gemma4-export[{self.extra}]')"


def register(cls: type[Target]) -> type[Target]:
    _REGISTRY[cls.name] = cls()
    return cls


def _load() -> dict[str, Target]:
    if len(_REGISTRY) < len(TARGET_MODULES):
        for m in TARGET_MODULES:
            importlib.import_module(f"{__package__}.{m}")
    return _REGISTRY


def targets() -> dict[str, Target]:
    """Every registered target, by name, in TARGET_MODULES order."""
    reg = _load()
    return {n: reg[n] for n in sorted(reg, key=lambda n: (TARGET_MODULES + (n,)).index(n))}


def target_names() -> list[str]:
    return list(targets())


def get_target(name: str | Target) -> Target:
    if isinstance(name, Target):
        return name
    key = (name or "").strip().lower()
    reg = targets()
    if key not in reg:
        raise Gemma4ExportError(f"unknown target {name!r}; choose from {', '.join(reg)}")
    return reg[key]


def detect_target(artifact: Path) -> Target:
    """The target whose artifact this is."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise Gemma4ExportError(f"{artifact}: no such artifact")
    for t in targets().values():
        if t.recognises(artifact):
            return t
    kinds = ", ".join(f"a {t.name} {t.artifact_kind}" for t in targets().values())
    raise Gemma4ExportError(f"{artifact}: not an artifact gemma4-export knows ({kinds})")


def probe_platform(names: list[str] | tuple[str, ...] | None = None) -> Platform:
    """Look at this machine: torch's devices, and each named target's runtime (imported only when asked)."""
    import platform as _platform

    import torch

    runtimes = {}
    for n in names if names is not None else target_names():
        try:
            runtimes[n] = get_target(n).probe()
        except Exception:  # not installed, or a build that cannot load here
            runtimes[n] = None
    return Platform(_platform.system(), _platform.machine(), bool(torch.cuda.is_available()), _mps_works(torch),
                    runtimes)


def _mps_works(torch) -> bool:
    """torch.backends.mps.is_available(), and a tensor can really be made there (virtual Macs, such as hosted CI
    runners, report MPS available but fail every allocation)."""
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return False
    try:
        return float((torch.ones(4, device="mps") * 2).sum().item()) == 8.0
    except Exception:
        return False
