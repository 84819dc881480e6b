"""The validation matrix: argument checks before any work, skip decisions, the plot, the manifest, and real runs
(tiny-31b through llama.cpp, the fastest cells) with a passing, a failing and an erroring cell."""

import dataclasses
import hashlib
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gemma4_export.errors import Gemma4ExportError, UnknownVariantError
from gemma4_export.report import human_bytes
from gemma4_export.targets.registry import Platform, get_target, probe_platform
from gemma4_export.validate import matrix as M
from gemma4_export.validate import matrix_outputs as O
from gemma4_export.validate import matrix_request as R
from gemma4_export.validate.svgplot import KLD_FLOOR, Point, kld_vs_size_svg

ALL = ["gguf", "mlx", "onnx"]
SVG = "{http://www.w3.org/2000/svg}"



def box(system="Linux", machine="x86_64", torch_cuda=False, torch_mps=False, llama_cpp=True, llama_gpu_offload=False,
        mlx=True, mlx_metal=False, onnx_providers=("CPUExecutionProvider",)) -> Platform:
    return Platform(system, machine, torch_cuda, torch_mps, {
        "gguf": {"gpu_offload": llama_gpu_offload} if llama_cpp else None,
        "mlx": {"metal": mlx_metal} if mlx else None,
        "onnx": {"providers": onnx_providers} if onnx_providers is not None else None})


LINUX = box()
CUDA_BOX = box(torch_cuda=True, llama_gpu_offload=True, onnx_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
MAC_ARGS = dict(system="Darwin", machine="arm64", torch_mps=True, llama_gpu_offload=True, mlx_metal=True,
                onnx_providers=("CoreMLExecutionProvider", "CPUExecutionProvider"))
MAC = box(**MAC_ARGS)


def skip_reason(target, device, platform):
    return get_target(target).skip_reason(device, platform)


# ---- what is asked for ------------------------------------------------------------------------------------------


def test_quants_by_target_and_bare_names():
    q = R.parse_quants(["gguf:q4_k_m,q8_0", "onnx:int4"], ALL)
    assert q == {"gguf": ["q4_k_m", "q8_0"], "onnx": ["int4"]}
    # targets without presets get their main preset
    assert R.resolve_quants(ALL, q) == {"gguf": ["q4_k_m", "q8_0"], "mlx": ["4bit"], "onnx": ["int4"]}
    assert R.resolve_quants(ALL, None) == {"gguf": ["q4_k_m"], "mlx": ["4bit"], "onnx": ["int4"]}
    # a bare preset goes to the targets that have it
    assert R.parse_quants(["q8_0"], ALL) == {"gguf": ["q8_0"]}
    assert R.parse_quants(["8bit,4bit"], ALL) == {"mlx": ["8bit", "4bit"]}
    assert R.parse_quants(["bf16"], ["gguf", "mlx"]) == {"gguf": ["bf16"], "mlx": ["bf16"]}
    assert R.parse_quants(["Q8_0", "gguf:q8_0"], ["gguf"]) == {"gguf": ["q8_0", "q8_0"]}
    assert R.resolve_quants(["gguf"], {"gguf": ["q8_0", "q8_0"]}) == {"gguf": ["q8_0"]}


@pytest.mark.parametrize("specs, targets, message", [
    (["gguf:q9_9"], ALL, "unknown gguf preset 'q9_9'; choose from f32"),
    (["q9_9"], ALL, "unknown preset 'q9_9' (no target has a preset of that name)"),
    (["tflite:int8"], ALL, "unknown target 'tflite'"),
    (["4bit"], ["gguf", "onnx"], "it is a mlx preset, and the targets are gguf, onnx"),
    (["mlx:4bit"], ["gguf"], "presets given for mlx, which is not among the targets"),
    (["gguf:"], ["gguf"], "no presets given for gguf"),
    ([], ["gguf", "tflite"], "unknown target 'tflite'"),
])
def test_bad_quants_are_refused(specs, targets, message):
    with pytest.raises(Gemma4ExportError, match=re.escape(message)):
        R.parse_quants(specs, targets)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(variants=["tiny-99b"]), UnknownVariantError, "unknown variant 'tiny-99b'"),
    (dict(targets=["gguf", "tflite"]), Gemma4ExportError, "unknown target 'tflite'"),
    (dict(quants={"gguf": ["q9_9"]}), Gemma4ExportError, "unknown gguf preset 'q9_9'"),
    (dict(quants={"mlx": ["4bit"]}), Gemma4ExportError, "not among the targets"),
    (dict(device="tpu"), Gemma4ExportError, "unknown device 'tpu'"),
    (dict(quants={"gguf": ["q8_0"]}, new_tokens=16), Gemma4ExportError,
     "new_tokens=16 is below the 25-token mean first-divergence threshold of gguf q8_0"),
])
def test_run_matrix_refuses_before_any_work(tmp_path, kwargs, error, message):
    args = dict(variants=["tiny-31b"], targets=["gguf"], out_dir=tmp_path / "m") | kwargs
    with pytest.raises(error, match=re.escape(message)):
        M.run_matrix(**args)
    assert not (tmp_path / "m").exists()


def test_cuda_without_cuda_is_an_error_for_the_whole_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(Gemma4ExportError, match="--device cuda: torch sees no CUDA device"):
        M.run_matrix(["tiny-31b"], ["gguf", "mlx"], device="cuda", out_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---- what this machine can run ----------------------------------------------------------------------------------


def test_skip_reasons():
    assert skip_reason("mlx", "cuda", CUDA_BOX) == "MLX's GPU runs on Apple Silicon only"
    assert skip_reason("gguf", "cuda", CUDA_BOX) is None and skip_reason("onnx", "cuda", CUDA_BOX) is None
    for t in ALL:
        assert skip_reason(t, "cpu", LINUX) is None
        assert skip_reason(t, "mps", MAC) is None, t
    no_offload = box(torch_cuda=True, onnx_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert "no GPU offload" in skip_reason("gguf", "cuda", no_offload)
    assert "-DGGML_CUDA=on" in skip_reason("gguf", "cuda", no_offload)
    assert "-DGGML_METAL=on" in skip_reason("gguf", "mps", box(**MAC_ARGS | dict(llama_gpu_offload=False)))
    assert skip_reason("gguf", "cpu", no_offload) is None  # the CPU needs no offload
    assert "not installed" in skip_reason("gguf", "cpu", box(llama_cpp=False))
    assert "not installed" in skip_reason("mlx", "cpu", box(mlx=False))
    assert "Apple Silicon, not Linux x86_64" in skip_reason("mlx", "mps", box(torch_mps=True))
    assert "no Metal device" in skip_reason("mlx", "mps", box(**MAC_ARGS | dict(mlx_metal=False)))
    assert "onnxruntime is not installed" in skip_reason("onnx", "cpu", box(onnx_providers=None))
    assert "has no CUDAExecutionProvider (it has CPUExecutionProvider)" in skip_reason("onnx", "cuda", LINUX)
    assert "has no CoreMLExecutionProvider" in skip_reason("onnx", "mps", LINUX)


def test_device_check():
    R.check_device("cpu", LINUX)
    R.check_device("cuda", CUDA_BOX)
    R.check_device("mps", MAC)
    with pytest.raises(Gemma4ExportError, match="torch sees no CUDA device"):
        R.check_device("cuda", LINUX)
    with pytest.raises(Gemma4ExportError, match="torch sees no Metal device"):
        R.check_device("mps", LINUX)
    with pytest.raises(Gemma4ExportError, match="unknown device"):
        R.check_device("gpu", MAC)
    # with stored references torch runs nothing here: a Mac whose torch has no Metal still runs MLX on Metal
    R.check_device("mps", LINUX, stored_reference=True)
    with pytest.raises(Gemma4ExportError, match="unknown device"):
        R.check_device("gpu", MAC, stored_reference=True)


def test_cells_are_decided_before_running():
    cells = M.plan_cells(["tiny-31b", "tiny-e2b"], {"gguf": ["q4_k_m"], "mlx": ["4bit", "8bit"]}, "cuda", CUDA_BOX)
    assert [(c.variant, c.target, c.preset) for c in cells][:3] == [("tiny-31b", "gguf", "q4_k_m"),
                                                                    ("tiny-31b", "mlx", "4bit"),
                                                                    ("tiny-31b", "mlx", "8bit")]
    assert len(cells) == 6
    assert {c.result for c in cells if c.target == "gguf"} == {"pending"}
    assert {(c.result, c.reason) for c in cells if c.target == "mlx"} == {("skip",
                                                                           "MLX's GPU runs on Apple Silicon only")}
    assert all(c.device == "cuda" for c in cells)
    assert cells[0].backend == "llama.cpp, all layers offloaded (cuda)"
    # skipped cells do not fail a run
    res = M.MatrixResult([c for c in cells if c.result == "skip"], Path("."), "cuda", CUDA_BOX, {}, "now")
    assert res.passed and res.counts()["skip"] == 4


def test_probe_of_this_machine():
    import importlib.util

    p = probe_platform(ALL)
    assert (p.runtime("gguf") is not None) == (importlib.util.find_spec("llama_cpp") is not None)
    assert (p.runtime("mlx") is not None) == (importlib.util.find_spec("mlx") is not None
                                              and importlib.util.find_spec("mlx_lm") is not None)
    if importlib.util.find_spec("onnxruntime") is not None:
        assert "CPUExecutionProvider" in p.runtime("onnx")["providers"]
    assert probe_platform([]).runtime("gguf") is None  # runtimes of targets not asked for are not imported


# ---- the plot ---------------------------------------------------------------------------------------------------


def _circles(root, target):
    g = root.find(f".//{SVG}g[@data-target='{target}']")
    return g, g.findall(f"{SVG}circle")


def test_plot_has_one_series_per_target_and_clamps_zero():
    pts = [Point("gguf", "tiny-31b/q8_0", 20.0, 1.2e-3), Point("gguf", "tiny-31b/f32", 80.0, 0.0),
           Point("gguf", "tiny-31b/q4_k_m", 12.0, 1.1e-2), Point("mlx", "tiny-31b/4bit", 14.0, 8e-3),
           Point("onnx", "tiny-e2b/int4", 15.0, 2e-2)]
    root = ET.fromstring(kld_vs_size_svg(pts))
    assert root.tag == f"{SVG}svg"
    series = root.findall(f".//{SVG}g[@class='series']")
    assert [g.get("data-target") for g in series] == ["gguf", "mlx", "onnx"]
    assert len({g.get("fill") for g in series}) == 3
    g, cs = _circles(root, "gguf")
    assert len(cs) == 3
    labels = [t.text for t in g.findall(f"{SVG}text")]
    assert labels == ["tiny-31b/q8_0", "tiny-31b/f32", "tiny-31b/q4_k_m"]
    x = [float(c.get("cx")) for c in cs]
    y = [float(c.get("cy")) for c in cs]
    assert all(math.isfinite(v) for v in x + y)
    assert x[2] < x[0] < x[1]  # size grows to the right
    assert y[2] < y[0] < y[1]  # KLD grows upwards; the zero KLD sits at the floor, lowest of all
    assert cs[1].get("fill") == "white" and "drawn at the floor" in cs[1].find(f"{SVG}title").text
    assert max(float(c.get("cy")) for c in root.iter(f"{SVG}circle") if c.get("class") == "point") == y[1]
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "mean KLD (log scale)" in texts and "artifact size (MB)" in texts and f"1e{round(math.log10(KLD_FLOOR))}" \
        in texts
    legend = root.find(f".//{SVG}g[@class='legend']")
    assert [t.text for t in legend.findall(f"{SVG}text")] == ["gguf", "mlx", "onnx"]


def test_plot_without_points_is_still_a_document():
    root = ET.fromstring(kld_vs_size_svg([]))
    assert "no validated artifacts" in " ".join(t.text or "" for t in root.iter(f"{SVG}text"))


# ---- digests ----------------------------------------------------------------------------------------------------


def test_digest_of_a_file_and_of_a_directory(tmp_path):
    import os

    f = tmp_path / "a.gguf"
    data = os.urandom(3 << 20)  # more than one read block
    f.write_bytes(data)
    d = O.artifact_digest(f)
    assert d == {"kind": "file", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    a = tmp_path / "m"
    (a / "sub").mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": os.urandom(1000), "sub/tokenizer.json": b"[1, 2]"}
    for rel, b in files.items():
        (a / rel).write_bytes(b)
    d = O.artifact_digest(a)
    want = {rel: hashlib.sha256(b).hexdigest() for rel, b in files.items()}
    assert d["kind"] == "directory" and {r["path"]: r["sha256"] for r in d["files"]} == want
    assert d["bytes"] == sum(len(b) for b in files.values())
    combined = "".join(f"{rel}\t{want[rel]}\n" for rel in sorted(want))
    assert d["sha256"] == hashlib.sha256(combined.encode()).hexdigest()
    (a / "sub" / "tokenizer.json").rename(a / "tokenizer.json")  # same bytes, another place: another digest
    assert O.artifact_digest(a)["sha256"] != d["sha256"]


# ---- real runs --------------------------------------------------------------------------------------------------

FAST = dict(windows=2, prompts=2, new_tokens=32)  # at least q8_0's 25-token first-divergence threshold


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("matrix")
    seen = []
    res = M.run_matrix(["tiny-31b"], ["gguf"], {"gguf": ["q8_0"]}, out_dir=out, on_cell=seen.append, **FAST)
    return res, out, seen


def _rows(md: str) -> dict[tuple[str, str, str], dict[str, str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(O.COLUMNS) and cells[0].startswith("tiny-"):
            rows[tuple(cells[:3])] = dict(zip(O.COLUMNS, cells))
    return rows


def test_end_to_end_outputs(e2e):
    res, out, seen = e2e
    for name in ("matrix.md", "matrix.json", "matrix-kld-vs-size.svg", "manifest.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.rglob(".*") if p.is_file()], "no temporary files are left"
    (cell,) = res.cells
    assert res.passed and cell.result == "pass", (cell.reason, cell.failures)
    assert seen == [cell] and "PASS" in O.cell_line(cell)
    assert cell.seconds["total"] >= cell.seconds["export"] + cell.seconds["validate"] > 0

    art = out / "artifacts" / "tiny-31b-q8_0.gguf"
    report = json.loads((out / "artifacts" / "tiny-31b-q8_0.gguf.validation.json").read_text())
    lg, gm = report["logits"], report["generation"]
    row = _rows((out / "matrix.md").read_text())[("tiny-31b", "gguf", "q8_0")]
    assert row == {"variant": "tiny-31b", "target": "gguf", "preset": "q8_0",
                   "size": human_bytes(report["artifact_bytes"]),
                   "bits per weight": f"{report['bits_per_weight']:.2f}",
                   "mean KLD": f"{lg['kld_mean']:.2e}", "p99.9 KLD": f"{lg['kld_p999']:.2e}",
                   "top-1": f"{lg['top1_agreement']:.4f}", "PPL ratio": f"{lg['ppl_ratio']:.5f}",
                   "generation match": f"{gm['exact_match_rate']:.3f}", "result": "pass",
                   "seconds": f"{cell.seconds['total']:.1f}"}
    assert report["artifact_bytes"] == art.stat().st_size

    record = json.loads((out / "matrix.json").read_text())
    (rc,) = record["cells"]
    assert rc["report"] == report and record["passed"] is True and record["counts"]["pass"] == 1
    assert record["device"]["requested"] == "cpu" and rc["device"] == "cpu"
    assert rc["runtime"]["device"] == "cpu" and rc["reference"]["device"] == "cpu"
    assert record["versions"]["torch"] and record["versions"]["llama-cpp-python"]
    assert record["settings"]["windows"] == 2 and record["started"] <= record["finished"]

    m, mm = json.loads((out / "manifest.json").read_text())["artifacts"]
    # the projector beside the GGUF (tiny-31b has a vision tower), validated with it: listed once, by its users
    proj = out / "artifacts" / "mmproj-tiny-31b-f16.gguf"
    assert mm == {"path": "artifacts/mmproj-tiny-31b-f16.gguf", "target": "gguf", "variant": "tiny-31b",
                  "role": "towers", "kind": "file", "bytes": proj.stat().st_size,
                  "sha256": hashlib.sha256(proj.read_bytes()).hexdigest(),
                  "plan": "artifacts/mmproj-tiny-31b-f16.gguf.plan.json", "used_by": ["artifacts/tiny-31b-q8_0.gguf"]}
    assert {"image_embeddings", "image_generation"} <= set(report["checks"])
    assert m["path"] == "artifacts/tiny-31b-q8_0.gguf" and m["kind"] == "file" and m["result"] == "pass"
    assert m["sha256"] == hashlib.sha256(art.read_bytes()).hexdigest() and m["bytes"] == art.stat().st_size
    assert (m["target"], m["variant"], m["preset"]) == ("gguf", "tiny-31b", "q8_0")
    assert m["validation"] == {"json": "artifacts/tiny-31b-q8_0.gguf.validation.json",
                               "md": "artifacts/tiny-31b-q8_0.gguf.validation.md"}
    plan = json.loads((out / m["plan"]).read_text())
    assert m["plan"] == "artifacts/tiny-31b-q8_0.gguf.plan.json" and plan["preset"] == "q8_0"

    root = ET.fromstring((out / "matrix-kld-vs-size.svg").read_text())
    g, cs = _circles(root, "gguf")
    assert len(cs) == 1 and g.find(f"{SVG}text").text == "tiny-31b/q8_0"
    assert f"{cell.kld_mean:.3e}" in cs[0].find(f"{SVG}title").text


def test_a_failing_and_an_erroring_cell_fail_the_run_and_the_others_still_run(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from gemma4_export.validate import harness

    real = harness.thresholds_for

    def impossible_for_q8_0(target, preset):
        t = real(target, preset)
        return dataclasses.replace(t, kld_mean=-1.0) if preset == "q8_0" else t

    monkeypatch.setattr(harness, "thresholds_for", impossible_for_q8_0)
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "tiny-31b-q4_0.gguf").write_bytes(b"not ours")  # and force=False: an export error
    seen = []
    res = M.run_matrix(["tiny-31b"], ["gguf"], {"gguf": ["q8_0", "q4_0", "q4_k_m"]}, out_dir=tmp_path,
                       on_cell=seen.append, force=False, **FAST)
    assert [c.result for c in res.cells] == ["fail", "error", "pass"] and seen == res.cells
    assert not res.passed
    fail, error, ok = res.cells
    assert fail.failures and fail.failures[0].startswith("mean KLD") and fail.kld_mean is not None
    assert "exists; pass --force" in error.reason and error.artifact is None
    assert ok.kld_mean is not None

    rows = _rows((tmp_path / "matrix.md").read_text())
    assert [r["result"] for r in rows.values()] == ["fail", "error", "pass"]
    assert rows[("tiny-31b", "gguf", "q4_0")]["mean KLD"] == "—"
    md = (tmp_path / "matrix.md").read_text()
    assert "tiny-31b/gguf/q8_0: fail: mean KLD" in md and "tiny-31b/gguf/q4_0: error:" in md
    manifest = json.loads((tmp_path / "manifest.json").read_text())["artifacts"]
    assert [(m.get("preset"), m.get("result")) for m in manifest] == [("q8_0", "fail"), (None, None),
                                                                       ("q4_k_m", "pass")]
    assert manifest[1]["role"] == "towers" and manifest[1]["used_by"] == [manifest[0]["path"], manifest[2]["path"]]
    record = json.loads((tmp_path / "matrix.json").read_text())
    assert record["passed"] is False and record["counts"] == {"pass": 1, "fail": 1, "error": 1,
                                                                              "skip": 0, "pending": 0}


@pytest.mark.slow
def test_stored_references_give_the_live_verdicts(tmp_path):
    """The matrix against references computed and stored beforehand (the CI's shared references) gives the
    verdicts and numbers of the matrix that computes them itself: on the per-layer-embedding model and the MoE one
    (the two whose references hold the most: PLE inputs, KV-shared layers, expert choices)."""
    pytest.importorskip("llama_cpp")
    from gemma4_export import api

    variants = ["tiny-e2b", "tiny-26b-a4b"]
    refs = tmp_path / "references"
    for v in variants:  # the standard evaluation, as CI computes it
        api.reference(v, out=refs / v)
    quants = {"gguf": ["q4_k_m"]}
    live = M.run_matrix(variants, ["gguf"], quants, out_dir=tmp_path / "live")
    stored = M.run_matrix(variants, ["gguf"], quants, out_dir=tmp_path / "stored", reference=refs)
    assert [c.name for c in live.cells] == [c.name for c in stored.cells] and len(live.cells) == len(variants)
    for a, b in zip(live.cells, stored.cells):
        assert a.result == b.result == "pass", (a.name, a.failures, b.failures, b.reason)
        assert a.kld_mean == pytest.approx(b.kld_mean, rel=1e-6) and a.top1 == b.top1, a.name
        assert b.reference["stored"] == b.variant
    # a matrix asked for a variant it holds no reference of says so, and which command makes one
    res = M.run_matrix(["tiny-31b"], ["gguf"], {"gguf": ["q8_0"]}, out_dir=tmp_path / "none",
                       reference=tmp_path / "empty")
    assert res.cells[0].result == "error" and "gemma4-export reference --variant tiny-31b" in res.cells[0].reason
