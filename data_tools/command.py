"""Running one data_tools subcommand: what `python -m data_tools X` and `python -m data_tools.X` share."""
from __future__ import annotations

import argparse

from trainer.config_checks import user_error
from trainer.data.storage import RemoteError


def run_command(module, args: argparse.Namespace) -> int:
    """module.run(args); an expected user error becomes one clear line on stderr and exit status 2."""
    try:
        return module.run(args)
    except (FileExistsError, FileNotFoundError, PermissionError, RemoteError, ValueError) as err:
        return user_error(err)              # expected user errors: one clear line, no traceback
