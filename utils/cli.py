"""What every script shares at its edges: one-line flag errors, what this machine can run (device, fast bf16),
and errors -> exit codes.

Exit codes of every script: 0 done, 1 training stopped by a non-finite loss or weights, 2 user error (bad flag,
config, checkpoint or data; an output folder that cannot be written; a full disk), 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import torch
from tqdm import tqdm

EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 2, 130


class UserError(ValueError):
    """Bad flags or inputs; the message is one line saying what to do."""


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (interrupt, non-finite loss); carries the process exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ValueError: every input check raises one (UserError, ConfigError, CheckpointError, the data and FID errors);
# OSError: a folder that cannot be read or written, a full disk (utils.checkpoint.OutputError says what to do)
USER_ERRORS = (ValueError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """Flag errors as one line (no usage dump), exit status 2 like argparse."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def check_device(name: str) -> torch.device:
    """A --device value this machine can run on, else a UserError saying what to pass instead."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def close_progress_bars() -> None:
    """Close the tqdm bars a failed loop left open, so that the error message that follows gets a line of its own."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def run_cli(fn: Callable[[], Any], debug: bool = False, interrupted: str = "interrupted") -> int:
    """Run a script's body and map its outcome to an exit code; tracebacks only with --debug.

    `interrupted` is the line printed on Ctrl-C (e.g. how to continue). Under torchrun only rank 0 prints
    (every rank exits with the same code).
    """
    def report(message: str) -> None:
        close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            print(message, file=sys.stderr)
    try:
        fn()
        return 0
    except USER_ERRORS as e:
        if debug:
            raise
        report(f"error: {e}")
        return EXIT_USER_ERROR
    except TrainingStopped as e:
        report(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        report(interrupted)
        return EXIT_INTERRUPTED
