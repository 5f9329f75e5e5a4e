"""What every command-line tool here shares: one-line errors, and the choice of device."""
import argparse
import sys

import torch

from ddpm import default_device

DEVICES = ("auto", "cpu", "cuda", "mps")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit code 2), like every other error here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA, else MPS, else the CPU; an explicit device must be available."""
    if name == "auto":
        return default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available here (use --device auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was requested but MPS is not available here (use --device auto or cpu)")
    return torch.device(name)


def exit_on_error(command, *args) -> None:
    """Run command(*args); bad input (ValueError and its kinds: bad checkpoint, data, flag; OSError; a
    non-finite loss) ends the program with one line on stderr and exit code 2, not a traceback."""
    try:
        command(*args)
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
