"""Command-line plumbing shared by the top-level scripts: one clear message and exit code 2 for bad input."""
import argparse
import contextlib
import functools
import math
import sys
import warnings


class UserError(Exception):
    """A problem with the user's input or environment; printed as one line, exit code 2, no traceback."""


def warn(msg):
    """Print a warning line to stderr (kept apart from progress bars and results on stdout)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def one_line(e):
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(e).split()) or type(e).__name__


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


@contextlib.contextmanager
def flag_hint(hint):
    """Append a script's advice (its flags) to a UserError raised inside: utils name concepts, scripts name flags."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{e} ({hint})") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: one 'error: ...' line on stderr and exit code 2 (argparse's own
    format prints the usage block first, which buries the message)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


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


SEED_MAX = 2 ** 63 - 1  # torch generators take 64-bit seeds; above this torch.manual_seed fails


def seed_int(text):
    """argparse type: a random seed, an integer in [0, 2^63 - 1]."""
    v = _int_at_least(text, 0, "non-negative")
    if v > SEED_MAX:
        raise_arg(f"a seed must be at most 2^63 - 1, got {v}")
    return v


def nonneg_float(text):
    """argparse type: a finite float >= 0."""
    v = finite_float(text)
    if v < 0:
        raise_arg(f"expected a non-negative number, got {v}")
    return v


def add_model_arguments(p, dtype_default=None, dtype_help="default bfloat16 on CUDA (as the reference), float32 on CPU"):
    """The model, device and precision options every script shares (values checked when resolved)."""
    from .models import DTYPES, SD_MODELS
    p.add_argument("--sd_ver", default="1", choices=list(SD_MODELS),
                   help="1 (SD v1.4), 2 (SD v2.0) or demo (bundled tiny model)")
    p.add_argument("--model_id", default=None,
                   help="Hub id, local folder, 'demo' or 'tiny' (random CPU model); overrides --sd_ver")
    p.add_argument("--dtype", default=dtype_default, choices=list(DTYPES), help=dtype_help)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--prompt_mirror", default=None, help="folder with verified benchmark prompt files (offline)")


def positive_float(text):
    """argparse type: a finite float > 0."""
    v = finite_float(text)
    if v <= 0:
        raise_arg(f"expected a positive number, got {v}")
    return v


def finite_float(text):
    """argparse type: a finite float (no nan or inf)."""
    try:
        v = float(text)
    except ValueError:
        raise_arg(f"expected a number, got {text!r}")
    if not math.isfinite(v):
        raise_arg(f"expected a finite number, got {text!r}")
    return v


def parse_int_list(text, low=None, high=None, what="values"):
    """Sorted unique integers from comma-separated text; a ValueError-free UserError naming `what` otherwise.

    low/high: inclusive bounds (None = unbounded). Returns a list of int.
    """
    try:
        vals = sorted({int(s) for s in str(text).split(",") if s.strip()})
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}")
    if not vals:
        raise UserError(f"{what}: no value given")
    if (low is not None and vals[0] < low) or (high is not None and vals[-1] > high):
        raise UserError(f"{what} must lie in {low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
                        f", got {text!r}")
    return vals


def raise_arg(msg):
    raise argparse.ArgumentTypeError(msg)
