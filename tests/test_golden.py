"""Golden plans: every published variant x every preset of every target, as a compact text snapshot.

A change to the rules, the presets or a target's size limits shows up here as a diff to review. Regenerate after a
deliberate change with

    python -m pytest tests/test_golden.py --update-golden

and read `git diff tests/golden` before committing. GGUF snapshots live at tests/golden/plan/<variant>-<preset>.txt
(where they always were), the other targets' under tests/golden/plan/<target>/<variant>-<preset>.txt.

Plans of published variants are built from their shipped configs only (no weights).
"""

from pathlib import Path

import pytest

from gemma4_export import api
from gemma4_export.quant.presets import presets_of
from gemma4_export.targets.registry import target_names
from conftest import REAL

GOLDEN = Path(__file__).parent / "golden" / "plan"
CASES = [(t, p) for t in target_names() for p in presets_of(t)]


def golden_path(target: str, variant: str, preset: str) -> Path:
    folder = GOLDEN if target == "gguf" else GOLDEN / target
    return folder / f"{variant}-{preset}.txt"


def golden_text(plan) -> str:
    """A compact, reviewable snapshot: globals, then one line per layer of `suffix=TYPE`, then the towers."""
    lines = [f"# {plan.variant} {plan.target} {plan.preset}: {plan.parameters} parameters, "
             f"{plan.total_bytes} bytes, {plan.bits_per_weight:.4f} bpw"]
    layers: dict[int, list[str]] = {}
    towers = 0
    for e in plan.entries:
        if e.role == "tower":
            towers += 1
            continue
        short = e.name.split("language_model.", 1)[-1]
        if e.layer is None:
            lines.append(f"{short}={e.type}")
        else:
            layers.setdefault(e.layer, []).append(f"{short.split('.', 2)[2]}={e.type}")
    lines += [f"layer {i}: " + " ".join(v) for i, v in sorted(layers.items())]
    lines.append(f"towers: {towers} tensors DROP")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("variant", REAL)
@pytest.mark.parametrize("target, preset", CASES, ids=[f"{t}-{p}" for t, p in CASES])
def test_golden_plan(target, preset, variant, update_golden):
    plan = api.plan(variant, target, preset)
    assert (plan.variant, plan.target, plan.preset) == (variant, target, preset)
    path = golden_path(target, variant, preset)
    text = golden_text(plan)
    if update_golden:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    assert path.exists(), f"no golden file {path}; run pytest --update-golden and review the diff"
    assert text == path.read_text(), (f"plan of {variant} {target} {preset} changed ({path}); review and run "
                                      f"pytest --update-golden")


def test_every_golden_file_is_expected():
    """No stale snapshot is left behind when a preset or a variant is renamed or removed."""
    expected = {golden_path(t, v, p) for t, p in CASES for v in REAL}
    found = {f for f in GOLDEN.rglob("*.txt")}
    assert found - expected == set(), f"golden files with no test: {sorted(map(str, found - expected))}"
