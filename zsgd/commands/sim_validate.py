"""``zsgd sim --validate`` and ``--tolerance``: the command's side of ``zsgd.experiments.validate``
(flags, the output directory, the table and the exit status); only click is imported at start-up."""

from __future__ import annotations

import shlex
import sys
from typing import Any, Callable

import click

from zsgd.errors import ZsgdError


def validate_options(func: Callable) -> Callable:
    func = click.option("--tolerance", default=None, metavar="FRACTION",
                        help="With --validate: the largest error allowed on each figure, e.g. 5% or 0.05 [default: 5%].")(func)
    func = click.option("--validate", is_flag=True,
                        help="Check the simulator on these flags: a short real emulated run here beside its simulated twin; "
                             "prints time per update, staleness, accuracy and bytes, real against simulated, writes "
                             "validate.png, and exits 1 beyond --tolerance.")(func)
    return func


def run_validate(cfg: Any, spec: Any, arms: list, out: str | None, tolerance_text: str | None, quiet: bool) -> None:
    """Run the check (``zsgd.experiments.validate``); print the table and where it is; raise beyond the tolerance."""
    from zsgd.experiments.validate import ValidationFailed, check_validatable, failure_line, failures, parse_tolerance, table, validate
    from zsgd.output.live import stderr_console
    from zsgd.output.rundir import check_out_dir, create_run_dir

    tolerance = parse_tolerance(tolerance_text)
    notes = check_validatable(spec, arms)  # before anything is written
    if out is not None:
        check_out_dir(out)
    out_dir = create_run_dir(out, f"validate-{cfg.model}")
    log = None if quiet else (lambda msg: stderr_console.print(msg, highlight=False, markup=False, soft_wrap=True))
    command = "zsgd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "zsgd sim --validate"
    rows = validate(cfg, spec, arms, out_dir, tolerance, log=log, command=command)
    if not quiet:
        stderr_console.print(table(rows, tolerance))
        for note in notes:
            stderr_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        stderr_console.print(f"table: {out_dir / 'validation.md'}; curves: {out_dir / 'validate.png'}", highlight=False, markup=False)
    click.echo(str(out_dir))
    if failures(rows, tolerance):
        raise ValidationFailed(failure_line(rows, tolerance))


def refuse_tolerance_alone(validate: bool, tolerance: str | None) -> None:
    if tolerance is not None and not validate:
        raise ZsgdError("--tolerance applies to --validate; add --validate")
