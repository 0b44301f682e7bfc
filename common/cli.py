"""The ``viewssl`` click group and the ``data`` commands.

``common`` owns the group and the error handling; ``ssv``, ``trajssl`` and ``experiments`` add their commands to it
(see ``experiments/cli.py``, the console-script entry point), so dependencies keep pointing one way.

Every user error (:class:`common.errors.ViewsslError`, or a click usage error) prints one line and exits with code 2;
``--debug`` shows the traceback.
"""
from __future__ import annotations

import logging
import shlex
import sys

import click

from .errors import ViewsslError

log = logging.getLogger("viewssl")


class _OneLineErrors:
    """Turns a :class:`ViewsslError` raised by the command into one line on stderr and exit code 2 (the traceback
    with the root command's ``--debug``). The root command also keeps the arguments it was called with, so that
    results can name the command that made them (:func:`invocation`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta.setdefault(_ARGV, list(args))  # meta is shared by the whole context chain: the root's arguments
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ViewsslError as e:
            if ctx.find_root().params.get("debug"):
                raise
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)


_ARGV = "viewssl.argv"


def invocation(program: str) -> str:
    """``PROGRAM ARGS...`` of the running command (``program``: ``"viewssl"`` or ``"python -m experiments.X"``), quoted
    for a shell. Its arguments are the root command's own (the same under ``CliRunner``); ``sys.argv``'s outside
    a command."""
    ctx = click.get_current_context(silent=True)
    args = ctx.meta.get(_ARGV, []) if ctx is not None else sys.argv[1:]
    return shlex.join([*program.split(), *args])


def comma_list(value: str, option: str, known) -> list[str]:
    """The comma-separated items of an option's ``value``: not empty, each one of ``known`` (else a one-line error
    naming ``option``)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in known]
    if bad or not items:
        raise ViewsslError(f"{option}: {'unknown ' + ', '.join(bad) if bad else 'empty list'} "
                           f"(choose from {', '.join(known)})")
    _no_repeats(items, option)
    return items


def _no_repeats(items: list, option: str) -> None:
    """A value given twice would be run twice and counted as two seeds or methods: refused."""
    twice = sorted({str(v) for v in items if items.count(v) > 1})
    if twice:
        raise ViewsslError(f"{option}: {', '.join(twice)} given more than once")


def int_list(value: str, option: str, minimum: int | None = None) -> list[int]:
    """The comma-separated integers of an option's ``value`` (``"0,1,2"``), not empty, none below ``minimum``."""
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ViewsslError(f"{option}: not comma-separated integers: {value!r}") from None
    if not items:
        raise ViewsslError(f"{option}: empty list")
    if minimum is not None and min(items) < minimum:
        raise ViewsslError(f"{option}: {min(items)} is below {minimum}")
    _no_repeats(items, option)
    return items


class ViewsslGroup(_OneLineErrors, click.Group):
    """A click group whose commands turn :class:`ViewsslError` into one line on stderr and exit code 2."""


class ViewsslCommand(_OneLineErrors, click.Command):
    """A stand-alone click command (``python -m experiments.<script>``) with the same one-line errors."""


@click.group(cls=ViewsslGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors in the log.")
@click.version_option(package_name="viewssl")
def cli(debug: bool, quiet: bool) -> None:
    """viewssl: learn object and head viewpoint without pose labels (SSV and Siamese encoders), and measure it."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@cli.group(cls=ViewsslGroup)
def data() -> None:
    """Render the synthetic benchmark and inspect datasets."""


@cli.group(cls=ViewsslGroup)
def train() -> None:
    """Train the SSV generator or a Siamese encoder."""


def resolve_device(name: str):
    """``auto`` -> cuda if available, else mps, else cpu; anything else is passed to torch.device."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ViewsslError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ViewsslError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ViewsslError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ViewsslError(f"--device {name}: MPS is not available on this machine")
    return device
