"""The CLI's subcommands: each module registers its parser and parses only; the work is in the library."""

import argparse


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1 (the flag's name comes with argparse's error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type for sampling seeds: the sampler's PRNG key is 32-bit."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value
