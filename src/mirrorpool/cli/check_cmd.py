"""`mirrorpool check [--repair]`: verify metadata against data files."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mirrorpool.cli.api_client import (
    DEFAULT_API,
    ApiOption,
    JsonOption,
    call,
    console,
    fail,
    print_json,
)


def check_command(
    repair: Annotated[bool, typer.Option("--repair", help="fix what can be fixed safely")] = False,
    data: Annotated[str | None, typer.Option(
        "--data", help="check this data directory directly (no device may be running on it)",
    )] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Check LUs, pool members, generations and files; exit 1 if problems remain."""
    if data is not None:
        from mirrorpool.device.check import check_device
        from mirrorpool.device.device import Device
        from mirrorpool.errors import DeviceBusy

        try:
            device = Device(data)
        except DeviceBusy as exc:
            fail(f"{exc}; check it through its API instead (drop --data)")
        try:
            report = check_device(device, repair)
        finally:
            device.close()
    else:
        report = call(api, "GET", "/v1/check", params={"repair": repair})
    if as_json:
        print_json(report)
    else:
        if report["problems"]:
            table = Table("LU", "problem", "repair", "repaired")
            for p in report["problems"]:
                table.add_row(p["lu"], p["problem"], p["repair"], "yes" if p["repaired"] else "")
            console.print(table)
        console.print(f"{report['lus']} LU(s) checked: "
                      + ("no problems" if report["ok"] else "problems remain"), highlight=False)
    if not report["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("check")(check_command)
