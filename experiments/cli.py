"""Console entry point ``viewssl``: the common group plus every family's commands."""
from __future__ import annotations

import importlib
import sys

from common.cli import cli

# Modules that add commands to the group when imported. A module that does not exist yet is skipped, so the CLI
# works while a family is being built; an import error inside an existing module is raised.
_COMMAND_MODULES = (
    "common.data.cli",
    "common.eval.cli",
    "ssv.cli",
    "trajssl.cli",
    "experiments.commands",
)


def _load_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


_load_commands()


def main() -> None:
    sys.exit(cli.main(prog_name="viewssl", standalone_mode=True))


if __name__ == "__main__":
    main()
