"""The ``viewssl`` click group and the ``data`` commands.

``common`` owns the group and the error handling; ``ssv``, ``trajssl`` and ``experiments`` add their commands to it
(see ``experiments/cli.py``, the console-script entry point), so dependencies keep pointing one way.

Every user error (:class:`common.errors.ViewsslError`, or a click usage error) prints one line and exits with code 2;
``--debug`` shows the traceback.
"""
from __future__ import annotations

import logging
import sys

import click

from .errors import ViewsslError

log = logging.getLogger("viewssl")


class _OneLineErrors:
    """Turns a :class:`ViewsslError` raised by the command into one line on stderr and exit code 2 (the traceback
    with the root command's ``--debug``)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ViewsslError as e:
            if ctx.find_root().params.get("debug"):
                raise
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)


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
    return device
