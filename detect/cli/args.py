"""Argument types shared by the subcommands: argparse turns their ``ArgumentTypeError`` into a usage error."""

from __future__ import annotations

import argparse

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2  # all done; some inputs failed; usage or set-up error


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value
