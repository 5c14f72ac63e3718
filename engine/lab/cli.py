"""``remediate lab``: bring lab devices up and down and give them field faults.

Usage (as root)::

    remediate lab up --devices 3 [--data-mb 256] [--lab-dir DIR]   # prints the inventory path
    remediate lab status [--lab-dir DIR]
    remediate lab inject dev1 fill --percent 95 --kind json-log
    remediate lab inject dev2 engine-crash --times 3
    remediate lab inject dev3 data-ro --form emergency-ro
    remediate lab inject dev3 os-update --stage running
    remediate lab clear dev1 fill
    remediate lab down [--lab-dir DIR]

Exit codes: 0 done, 2 bad input (unknown device/fault, no lab), 3 the lab failed as a tool.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from engine.errors import EngineError
from engine.lab import faults
from engine.lab.devices import DEFAULT_DATA_MB, Lab
from engine.lab.images import APP_ID, APP_SERVICE

DEFAULT_LAB_DIR = Path("/var/tmp/remediate-lab")  # noqa: S108 - root-owned lab state, documented

app = typer.Typer(
    name="lab",
    help=(
        "Simulated balenaOS devices (systemd, real Docker engine, a Supervisor stand-in, sshd"
        " on 22222) for runbooks."
    ),
    no_args_is_help=True,
)

LabDir = Annotated[
    Path, typer.Option("--lab-dir", help="Lab directory (state file, SSH key, inventory).")
]


def _fail(exc: EngineError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exc.exit_code)


@app.command()
def up(
    devices: Annotated[int, typer.Option("--devices", "-n", help="Number of devices.")] = 3,
    data_mb: Annotated[
        int, typer.Option("--data-mb", help="Size of each data partition in MB.")
    ] = DEFAULT_DATA_MB,
    lab_dir: LabDir = DEFAULT_LAB_DIR,
) -> None:
    """Bring the lab up and print the inventory path."""
    try:
        lab = Lab.up(lab_dir, devices=devices, data_mb=data_mb)
    except EngineError as exc:
        raise _fail(exc) from exc
    typer.echo(str(lab.inventory_path))


@app.command()
def down(lab_dir: LabDir = DEFAULT_LAB_DIR) -> None:
    """Stop every device and remove what the lab made."""
    try:
        lab = Lab.load(lab_dir)
        lab.down()
        leftovers = lab.find_leftovers()
    except EngineError as exc:
        raise _fail(exc) from exc
    for item in leftovers:
        typer.echo(f"left behind: {item}", err=True)
    if leftovers:
        raise typer.Exit(3)


@app.command()
def status(lab_dir: LabDir = DEFAULT_LAB_DIR) -> None:
    """Print each device's address, engine and Supervisor state, data partition (JSON lines)."""
    try:
        lab = Lab.load(lab_dir)
        for dev in lab.devices:
            if dev.is_alive():
                typer.echo(json.dumps(faults.describe(dev)))
            else:
                typer.echo(json.dumps({"name": dev.name, "engine": "device not running"}))
    except EngineError as exc:
        raise _fail(exc) from exc
    typer.echo(f"inventory: {lab.inventory_path}")


@app.command()
def inject(
    device: Annotated[str, typer.Argument(help="Device name, e.g. dev1.")],
    fault: Annotated[faults.Fault, typer.Argument(help="Fault to inject.")],
    percent: Annotated[int, typer.Option(help="fill: target Use% of /mnt/data.")] = 95,
    kind: Annotated[faults.FillKind, typer.Option(help="fill: what fills it.")] = (
        faults.FillKind.VOLUME
    ),
    times: Annotated[int, typer.Option(help="engine-crash: how many crashes.")] = 1,
    app_id: Annotated[str, typer.Option("--app", help="update-lock(-file): app id.")] = APP_ID,
    service: Annotated[str, typer.Option(help="update-lock(-file): service name.")] = APP_SERVICE,
    form: Annotated[
        faults.DataRoForm, typer.Option(help="data-ro: remounted ro, or an ext4 error.")
    ] = faults.DataRoForm.RO,
    stage: Annotated[
        faults.OsUpdateStage,
        typer.Option(help="os-update: rollback breadcrumbs, or hostapp-update running."),
    ] = faults.OsUpdateStage.ROLLBACK,
    lab_dir: LabDir = DEFAULT_LAB_DIR,
) -> None:
    """Inject a field fault into one device."""
    try:
        dev = Lab.load(lab_dir).device(device)
        msg = faults.inject(
            dev,
            fault,
            percent=percent,
            kind=kind,
            times=times,
            app=app_id,
            service=service,
            form=form,
            stage=stage,
        )
    except EngineError as exc:
        raise _fail(exc) from exc
    typer.echo(f"{device}: {msg}")


@app.command()
def clear(
    device: Annotated[str, typer.Argument(help="Device name, e.g. dev1.")],
    fault: Annotated[faults.Fault, typer.Argument(help="Fault to undo.")],
    lab_dir: LabDir = DEFAULT_LAB_DIR,
) -> None:
    """Undo a fault on one device (engine-crash: NRestarts stays, as after a real crash).

    data-ro in its emergency-ro form is undone as a reboot would: the engine stopped, the data
    partition unmounted, checked with e2fsck and mounted again.
    """
    try:
        dev = Lab.load(lab_dir).device(device)
        typer.echo(faults.clear(dev, fault))
    except EngineError as exc:
        raise _fail(exc) from exc


def main() -> None:
    """Run the lab CLI on its own (``python -m engine.lab.cli``)."""
    app()


if __name__ == "__main__":
    main()
