"""`avsr-shards` / `python -m data_tools`: build and check shard sets.

  synth     synthesise the GRID-style corpus (espeak-ng speech + mouth video)
  lrs3      convert an auto_avsr-prepared LRS3/LRS2 folder
  validate  check a shard set and its index
  pretrained  offline path (CI, air-gapped): fetch, verify and convert SmolLM2-135M and Whisper tiny.en weights
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from trainer.config_checks import OneLineParser

from . import lrs3, pretrained, synth, validate
from .command import run_command

COMMANDS = {
    "synth": (synth, "synthesise the GRID-style corpus into train/val/test shards"),
    "lrs3": (lrs3, "convert an auto_avsr-prepared LRS3/LRS2 folder into shards"),
    "validate": (validate, "check a shard set: index, tars and every sample"),
    "pretrained": (pretrained, "offline path (CI, air-gapped clusters): fetch, verify and convert SmolLM2-135M and Whisper tiny.en to transformers folders"),
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="avsr-shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help=", ".join(COMMANDS))
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _ = COMMANDS[args.command]
    return run_command(module, args)


if __name__ == "__main__":
    sys.exit(main())
