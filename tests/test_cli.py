"""The `gemma4-export` command as people read it: usage errors without tracebacks, tables that fit an 80-column
terminal, plain one-row-per-line listings in a pipe, and error messages on one line.

Most tests run the real console script in a subprocess (`python -m gemma4_export.cli`) with COLUMNS=80 and stdout
piped, so that rich sees no terminal; the terminal tests give it a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from gemma4_export.exporter.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
BOX = set("│┃━─┏┓┗┛┡┩┠┨┳┻╇┼╭╮╰╯")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _env(columns: int = 80) -> dict[str, str]:
    env = dict(os.environ, COLUMNS=str(columns), LINES="50", TERM="xterm-256color", NO_COLOR="1")
    # anything that would make rich call a pipe a terminal, or main() show tracebacks
    for k in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "GEMMA4_EXPORT_DEBUG", "PYTHONWARNINGS"):
        env.pop(k, None)
    return env


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma4_export.cli", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)


def run_in_pty(*args: str, columns: int = 80, timeout: float = 120) -> tuple[int, list[str]]:
    """Run the command with stdout and stderr on a pseudo-terminal `columns` wide: its exit status, and its lines
    without colours and carriage returns."""
    pty = pytest.importorskip("pty")
    try:
        master, slave = pty.openpty()
    except OSError as e:
        pytest.skip(f"no pseudo-terminal here: {e}")
    try:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    except (ImportError, OSError):
        pass  # COLUMNS still tells rich the width
    p = subprocess.Popen([sys.executable, "-m", "gemma4_export.cli", *args], stdout=slave, stderr=slave,
                         stdin=subprocess.DEVNULL, env=_env(columns), cwd=ROOT)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    text = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r", "")
    return p.returncode, text.splitlines()


# ---- usage errors ------------------------------------------------------------------------------------------------

USAGE_CASES = [
    # (arguments, the command path in the usage line, a piece of the error)
    (["gguf", "--adaptr", "x"], "gemma4-export gguf", "No such option: --adaptr"),
    (["gguf", "--quant"], "gemma4-export gguf", "'--quant' requires an argument"),
    (["mlx", "--adaptr", "x"], "gemma4-export mlx", "No such option: --adaptr"),
    (["onnx", "--adaptr", "x"], "gemma4-export onnx", "No such option: --adaptr"),
    (["plan", "--variantt", "e2b"], "gemma4-export plan", "No such option: --variantt"),
    (["validate", "--adaptr", "x", "model.gguf"], "gemma4-export validate", "No such option: --adaptr"),
    (["validate"], "gemma4-export validate", "Missing argument"),
    (["matrix", "--adaptr", "x"], "gemma4-export matrix", "No such option: --adaptr"),
    (["variants", "--jsn"], "gemma4-export variants", "No such option: --jsn"),
    (["frobnicate"], "gemma4-export", "No such command 'frobnicate'"),
    (["imatrix", "--variant", "tiny-e2b"], "gemma4-export imatrix", "Missing option '--out'"),
    (["gguf", "--variant", "tiny-e2b", "--max-size", "lots"], "gemma4-export gguf", "give a size such as 2.5GB"),
    (["plan", "--variant", "tiny-e2b", "--target-bpw", "x"], "gemma4-export plan", "Invalid value for '--target-bpw'"),
    (["--bogus"], "gemma4-export", "No such option: --bogus"),
]


@pytest.mark.parametrize("args,command,message", USAGE_CASES, ids=[" ".join(c[0]) for c in USAGE_CASES])
def test_usage_error_is_clicks_not_a_traceback(args, command, message):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.splitlines()
    assert any(ln.startswith(f"Usage: {command} ") for ln in lines), r.stderr
    assert f"Try '{command} --help' for help." in lines, r.stderr
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr


def test_misspelt_option_gets_a_suggestion():
    r = run("plan", "--variantt", "e2b")
    assert "--variant" in r.stderr.splitlines()[-1].split("--variantt", 1)[1]


def test_help_and_version_exit_0():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("gemma4-export ")
    r = run("plan", "--help")
    assert r.returncode == 0 and "--variant" in r.stdout and "Traceback" not in r.stderr


def test_no_arguments_prints_help_and_exits_2():
    r = run()
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "Usage: gemma4-export" in r.stdout + r.stderr


def test_ctrl_c_exits_130(monkeypatch, capsys):
    from gemma4_export import api, cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "plan", interrupted)
    monkeypatch.setattr(sys, "argv", ["gemma4-export", "plan", "--variant", "tiny-e2b"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130


# ---- error messages ----------------------------------------------------------------------------------------------


def test_error_message_is_one_line():
    r = run("plan", "--variant", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: unknown variant 'nope'") and lines[0].rstrip().endswith("tiny-26b-a4b-qat")
    assert len(lines[0]) > 80  # long enough that rich would have wrapped it at 80 columns


# ---- listings in a pipe ------------------------------------------------------------------------------------------


def test_variants_piped_one_line_per_variant():
    r = run("variants")
    assert r.returncode == 0, r.stderr
    assert not BOX & set(r.stdout), "box drawing in a pipe"
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["variant", "hub", "id"]
    assert len(lines) == 1 + len(VARIANTS), r.stdout  # a header, then one line per variant: nothing wrapped
    by_name = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert list(by_name) == list(VARIANTS)
    for name, v in VARIANTS.items():
        if v.hub_id:
            assert by_name[name][1] == v.hub_id
    assert by_name["e2b"][1] == "google/gemma-4-E2B"
    assert by_name["e2b"][-1] == "Gemma4ForConditionalGeneration"
    assert by_name["12b"][-1] == "Gemma4UnifiedForConditionalGeneration"


def test_variants_json_unchanged():
    r = run("variants", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["variant"] for row in rows] == list(VARIANTS)
    assert set(rows[0]) == {"variant", "hub_id", "class", "parameters", "layers", "features", "towers", "local"}


def test_plan_piped_one_line_per_tensor():
    r = run("plan", "--variant", "31b")
    assert r.returncode == 0, r.stderr
    assert not BOX & set(r.stdout), "box drawing in a pipe"
    lines = r.stdout.splitlines()
    assert lines[0] == "31b: gguf q4_k_m"
    assert lines[1].split() == ["name", "shape", "type", "bytes", "rule"]
    end = lines.index("")
    rows = [ln.split() for ln in lines[2:end]]
    text = [row for row in rows if not row[0].endswith("*")]  # the towers: one line each, without --all
    assert all(len(row) == 5 and row[0].startswith("model.") for row in text), [r for r in text if len(r) != 5][:3]
    assert all(re.fullmatch(r"[\d,]+", row[3]) for row in text)
    names = {row[0]: row for row in text}
    assert len(names) == len(text)  # one line per tensor
    for layer in range(60):
        q = names[f"model.language_model.layers.{layer}.self_attn.q_proj.weight"]
        assert q[2] == "Q4_K" and q[4] == "matrix"
    assert names["model.language_model.embed_tokens.weight"][1:3] == ["262144x5376", "Q6_K"]
    assert any(ln.startswith("model.vision_tower.* (") for ln in lines[2:end])
    assert "matrix: weight matrix: the preset's base type" in lines[end:]
    summary = lines[-1]
    assert summary.startswith("31b gguf q4_k_m: ") and "bits per weight" in summary and "Q6_K: " in summary


# ---- tables in a terminal ----------------------------------------------------------------------------------------


def test_variants_table_fits_80_columns_in_a_terminal():
    rc, lines = run_in_pty("variants", columns=80)
    assert rc == 0, lines
    assert BOX & set("".join(lines)), "expected a table on a terminal"
    assert all(len(ln) <= 80 for ln in lines), max(lines, key=len)
    e2b = next(ln for ln in lines if ln.split()[:1] == ["e2b"])
    assert e2b.split()[1] == "google/gemma-4-E2B"  # whole, on the variant's line
    for name, v in VARIANTS.items():
        row = [ln.split() for ln in lines if ln.split()[:1] == [name]]
        assert len(row) == 1 and (not v.hub_id or row[0][1] == v.hub_id), name


def test_plan_table_fits_80_columns_in_a_terminal():
    rc, lines = run_in_pty("plan", "--variant", "e2b", columns=80)
    assert rc == 0, lines
    summary = next(ln for ln in lines if ln.startswith("e2b gguf q4_k_m: "))
    assert "bits per weight" in summary and summary.rstrip().endswith(tuple("0123456789"))  # one logical line
    table = [ln for ln in lines if not ln.startswith("e2b gguf q4_k_m: ")]
    assert all(len(ln) <= 80 for ln in table), max(table, key=len)
    words = {w for ln in table for w in ln.split()}
    for name in ("layers.0.self_attn.q_proj", "embed_tokens_per_layer", "per_layer_model_projection",
                 "layers.34.post_feedforward_layernorm"):
        assert name in words or f"{name}.weight" in words, name
    assert "ple-model-projection" in words and "Q4_K" in words


@pytest.mark.parametrize("width", [80, 100, 120, 150, 200])
def test_tables_fit_any_width(width):
    """In process: at each width the chosen table is no wider than the terminal and breaks no hub id."""
    from gemma4_export.report import variants_table

    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(variants_table(width=width))
    lines = console.export_text().splitlines()
    assert all(len(ln) <= width for ln in lines)
    for v in VARIANTS.values():
        if v.hub_id:
            assert any(v.hub_id in ln.split() for ln in lines), v.hub_id


def test_too_narrow_for_a_table_gives_lines():
    from gemma4_export.report import variants_lines, variants_table

    assert variants_table(width=60) is None
    assert len(variants_lines()) == 1 + len(VARIANTS)


def test_imatrix_command_writes_a_file_the_export_reads(tmp_path):
    """`imatrix` writes llama.cpp's GGUF imatrix; `gguf --imatrix` quantizes with it, and names it in the file."""
    imat = tmp_path / "tiny-31b.imatrix.gguf"
    r = run("imatrix", "--variant", "tiny-31b", "--out", str(imat), "--calibration-chunks", "1")
    assert r.returncode == 0, r.stderr
    assert "matrices, 1 chunks x 1024 tokens" in r.stdout and imat.is_file()
    r = run("gguf", "--variant", "tiny-31b", "--quant", "q4_k_m", "--imatrix", str(imat), "--out", str(tmp_path),
            "--no-validate")
    assert r.returncode == 0, r.stderr
    from gemma4_export.targets.gguf_file import read_gguf

    meta = read_gguf(tmp_path / "tiny-31b-q4_k_m.gguf").metadata
    assert meta["quantize.imatrix.file"] == imat.name and meta["quantize.imatrix.chunks_count"] == 1
    r = run("imatrix", "--variant", "tiny-31b", "--out", str(imat))
    assert r.returncode != 0 and "exists" in r.stderr  # never overwritten without --force


def test_gptq_is_on_by_default_and_no_gptq_turns_it_off(tmp_path):
    """A calibrated export records GPTQ's second moments in its plan; --no-gptq writes the weighted rounding alone,
    other bytes."""
    def export(*extra):
        out = tmp_path / "-".join(extra or ("default",))
        r = run("gguf", "--variant", "tiny-31b", "--quant", "q4_k_m", "--calibration-chunks", "2", "--text-only",
                "--no-validate", "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        art = out / "tiny-31b-q4_k_m.gguf"
        return art.read_bytes(), json.loads(Path(f"{art}.plan.json").read_text())["calibration"]

    on, plan_on = export()
    off, plan_off = export("--no-gptq")
    assert plan_on["gptq"]["matrices"] > 0 and "gptq" not in plan_off
    assert on != off


def test_stored_reference_with_the_checkpoint_checks_the_towers(tmp_path):
    """`validate --reference REF` reads the text reference from disk; naming the checkpoint too (--variant or
    --model-dir) adds the tower checks (embeddings, media-prompted generations), and another checkpoint is refused;
    --adapter joins a stored reference only to complete the towers' checkpoint."""
    art = tmp_path / "tiny-31b-f32.gguf"
    assert run("gguf", "--variant", "tiny-31b", "--quant", "f32", "--out", str(tmp_path), "--no-validate").returncode \
        == 0
    assert run("reference", "--variant", "tiny-31b", "--out", str(tmp_path / "ref"), timeout=300).returncode == 0
    alone = run("validate", str(art), "--reference", str(tmp_path / "ref"), timeout=300)
    assert alone.returncode == 0, alone.stderr
    assert "image embeddings" not in alone.stdout
    both = run("validate", str(art), "--reference", str(tmp_path / "ref"), "--variant", "tiny-31b", timeout=300)
    assert both.returncode == 0, both.stderr
    assert "image embeddings" in both.stdout and "image generation" in both.stdout
    other = run("validate", str(art), "--reference", str(tmp_path / "ref"), "--variant", "tiny-26b-a4b", timeout=300)
    assert other.returncode != 0 and "not the checkpoint of the stored reference" in other.stderr, other.stderr
    bad = run("validate", str(art), "--reference", str(tmp_path / "ref"), "--adapter", str(tmp_path))
    assert bad.returncode == 2 and "--reference replaces --adapter" in bad.stderr
