"""What every ragkv command shares: the console, the error exit, the home option."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

console = Console()

Home = Annotated[Path, typer.Option(help="ragkv home (model, index, blobs)")]


def fail(msg: str) -> NoReturn:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)
