"""The `gemma4-export` command: a thin layer that parses options and calls the library (gemma4_export.api).

Errors from bad input are printed as one line, without a traceback (set GEMMA4_EXPORT_DEBUG=1 to see it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import Gemma4ExportError

app = typer.Typer(
    name="gemma4-export",
    help="Export Gemma 4 checkpoints to GGUF, ONNX and MLX with Gemma 4 quantization rules, validated in each runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

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
PleTypeOpt = Annotated[
    Optional[str], typer.Option("--ple-type", help="Type of the per-layer-embedding table (E2B/E4B).")
]


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
    from .report import variants_table

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
    out.print(variants_table())


@app.command()
def plan(
    variant: VariantOpt = None,
    model_dir: ModelDirOpt = None,
    quant: Annotated[str, typer.Option("--quant", "-q", help="Preset: f32 bf16 f16 q8_0 q6_k q5_k_m q4_k_m q4_0.")] = "q4_k_m",
    tensor_type: TensorTypeOpt = None,
    ple_type: PleTypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    all_rows: Annotated[bool, typer.Option("--all", help="List every tower tensor instead of one row per tower.")] = False,
) -> None:
    """Show which type every tensor gets, and why, with totals (parameters, size, bits per weight).

    Examples:
      gemma4-export plan --variant e2b --quant q4_k_m
      gemma4-export plan --variant 26b-a4b --quant q4_k_m --json
      gemma4-export plan --model-dir ./gemma-4-E2B-it --quant q5_k_m --tensor-type 'attn_q=Q8_0'
    """
    from .api import make_plan
    from .report import plan_summary, plan_table

    p = make_plan(variant, model_dir, quant, tensor_type, ple_type)
    if as_json:
        sys.stdout.write(json.dumps(p.to_json()) + "\n")
        return
    out.print(plan_table(p, all_rows))
    out.print(plan_summary(p))


def main() -> None:
    try:
        app(standalone_mode=False)
    except Gemma4ExportError as e:
        if os.environ.get("GEMMA4_EXPORT_DEBUG"):
            raise
        from rich.text import Text

        err.print(Text("error: ", style="bold red") + Text(str(e)), highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written under the final name")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
