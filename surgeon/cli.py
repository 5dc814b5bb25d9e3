"""The `surgeon` command: parse arguments, call the library, render, map errors to exit codes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from surgeon.errors import ExitCode, SurgeonError

app = typer.Typer(
    name="surgeon",
    help="Find every strided convolution and pooling layer in a PyTorch model and replace it by policy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)
_state: dict[str, Any] = {"debug": False}

ModelArg = Annotated[
    str,
    typer.Argument(
        help="torchvision/timm name (resnet50, timm:resnet50) or package.module:factory."
    ),
]
InputSizeOpt = Annotated[
    str | None,
    typer.Option("--input-size", help="Example input size, e.g. 3x224x224 (video: 3x16x112x112)."),
]
KwargOpt = Annotated[
    list[str] | None,
    typer.Option("--model-kwarg", help="key=value passed to the model factory (repeatable)."),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option("--weights", help="State dict to load: .safetensors, or .pt/.pth (weights_only)."),
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained", help="Download the library's pretrained weights.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def _load(
    model: str,
    input_size: str | None,
    kwargs: list[str] | None,
    weights: Path | None,
    pretrained: bool,
) -> tuple[Any, tuple[Any, ...]]:
    from surgeon.models import example_inputs, load_model, parse_input_size, parse_kwargs

    size = parse_input_size(input_size) if input_size else None
    loaded = load_model(
        model, kwargs=parse_kwargs(kwargs or []), pretrained=pretrained, weights=weights
    )
    if size is not None:
        loaded.input_size = size
    err.print(
        f"[dim]model {loaded.spec.text} ({loaded.weights} weights), "
        f"input {'x'.join(map(str, loaded.input_size))}[/dim]"
    )
    return loaded, example_inputs(loaded.task, loaded.input_size)


@app.command()
def scan(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    model_kwarg: KwargOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    json: JsonOpt = False,
) -> None:
    """List every strided convolution and pooling site the graph walker finds."""
    from surgeon.report import render_scan, scan_json
    from surgeon.scan import scan as run_scan

    loaded, args = _load(model, input_size, model_kwarg, weights, pretrained)
    result = run_scan(loaded.model, args)
    if json:
        out.print_json(scan_json(result, model=loaded.spec.text))
    else:
        render_scan(result, out, title=f"{loaded.spec.text} sites")


@app.command()
def policies() -> None:
    """List the built-in policies."""
    from surgeon.policy import list_builtin_policies

    for name, description in list_builtin_policies():
        out.print(f"[bold]{name:12s}[/bold] {description}")


def main() -> None:
    """Entry point: run the app; SurgeonErrors become one line on stderr and an exit code."""
    try:
        app(standalone_mode=False)
    except SurgeonError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        sys.exit(ExitCode.INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # the CLI's last line of defence: never a raw traceback
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(ExitCode.INTERRUPTED)
        if _state["debug"]:
            raise
        err.print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback and please report it)",
            highlight=False,
        )
        sys.exit(ExitCode.USER_ERROR)
