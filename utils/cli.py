"""Command-line plumbing shared by the top-level scripts: one clear message and exit code 2 for bad input."""
import functools
import sys
import warnings


class UserError(Exception):
    """A problem with the user's input or environment; printed as one line, exit code 2, no traceback."""


def warn(msg):
    """Print a warning line to stderr (kept apart from progress bars and results on stdout)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def guarded(main):
    """Wrap a script's main(): UserError -> 'error: ...' and exit 2; Ctrl-C -> exit 130 with a resume hint."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("\ninterrupted: results so far are saved; run the same command again to resume.",
                  file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper


def quiet_library_warnings():
    """Silence third-party deprecation chatter that would bury the scripts' own messages."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()  # "Loading pipeline components" bars would bury the run's own progress bar
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # logging tweaks must never break a run
        pass


def _int_at_least(text, low, name):
    """An integer >= low parsed from text, or an argparse error naming the kind (name)."""
    try:
        v = int(text)
    except ValueError:
        raise_arg(f"expected a {name} integer, got {text!r}")
    if v < low:
        raise_arg(f"expected a {name} integer, got {v}")
    return v


def positive_int(text):
    """argparse type: an integer > 0."""
    return _int_at_least(text, 1, "positive")


def nonneg_int(text):
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "non-negative")


def positive_float(text):
    """argparse type: a finite float > 0."""
    v = finite_float(text)
    if v <= 0:
        raise_arg(f"expected a positive number, got {v}")
    return v


def finite_float(text):
    """argparse type: a finite float (no nan or inf)."""
    import math
    try:
        v = float(text)
    except ValueError:
        raise_arg(f"expected a number, got {text!r}")
    if not math.isfinite(v):
        raise_arg(f"expected a finite number, got {text!r}")
    return v


def raise_arg(msg):
    import argparse
    raise argparse.ArgumentTypeError(msg)
