"""Command-line plumbing shared by the top-level scripts: one clear message and exit code 2 for bad input."""
import argparse
import contextlib
import errno
import functools
import math
import os
import re
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


# What a script says when memory runs out; scripts with other knobs pass their own (guarded(memory_hint=...)).
MEMORY_HINT = "use fewer generations or a smaller batch"
# Allocation failures that libraries report as plain RuntimeError/OSError; matched on the message, so that every
# other RuntimeError (a bug) keeps its traceback.
_MEMORY_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory",
                    "failed to allocate")


def is_memory_error(e):
    """True for an allocation failure: MemoryError, torch.OutOfMemoryError, or a RuntimeError/OSError whose
    message says that memory could not be allocated (torch's CPU allocator, CUDA, ENOMEM)."""
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, OSError) and e.errno == errno.ENOMEM:
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _MEMORY_MESSAGES)


# Set by the run scripts for the processes they start under a launcher (NUM_PROCESSES > 1): a folder where a process
# that ends on bad input leaves its exit code, which the script passes on (the launcher itself exits with 1).
EXIT_DIR_ENV = "MEMSHARP_EXIT_DIR"


def record_exit_code(code):
    """Leave `code` in <$MEMSHARP_EXIT_DIR>/<pid>.code when the variable is set (a run script's launched process);
    a new file, never through a link; a folder that cannot take it is ignored (the exit code itself stands)."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    try:
        fd = os.open(os.path.join(folder, f"{os.getpid()}.code"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"{code}\n")
    except OSError:
        pass


def fail(message, code=2):
    """Print 'error: <message>' on stderr, record the code for a run script (record_exit_code) and exit with it."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    record_exit_code(code)
    sys.exit(code)


CHECK_ONLY_HELP = ("check the arguments (everything checked before the model is loaded) and exit: 0, or one error "
                   "line and 2; nothing is written. The run scripts do this once before a launcher starts")


def checked_only(enabled):
    """For a script's --check_only: when enabled, say that the arguments passed every check made before the model
    is loaded and nothing is written, and return True (the script then returns)."""
    if enabled:
        print("arguments checked: nothing was loaded or written (--check_only)", flush=True)
    return enabled


def guarded(main=None, *, memory_hint=MEMORY_HINT):
    """Wrap a script's main() so that every expected failure is one line on stderr, never a traceback:

    UserError (bad input, unwritable output, corrupted log) -> 'error: ...', exit 2;
    an allocation failure (is_memory_error) -> 'error: out of memory ...; <memory_hint>', exit 2;
    (both leave the code for a run script's launcher, record_exit_code);
    Ctrl-C -> exit 130 with a resume hint.
    Anything else is a bug and keeps its traceback. Use as @guarded or @guarded(memory_hint="lower --gen_num").
    """
    if main is None:
        return lambda f: guarded(f, memory_hint=memory_hint)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            fail(e)
        except KeyboardInterrupt:
            print("\ninterrupted: results so far are saved; run the same command again to resume.",
                  file=sys.stderr, flush=True)
            sys.exit(130)
        except (MemoryError, RuntimeError, OSError) as e:
            if not is_memory_error(e):
                raise
            fail(f"out of memory ({one_line(e)[:200]}); {memory_hint}")

    return wrapper


@contextlib.contextmanager
def flag_hint(hint, only=None):
    """Append a script's advice (its flags) to a UserError raised inside: utils name concepts, scripts name flags.
    only: a UserError subclass the hint is about (other errors pass unchanged)."""
    try:
        yield
    except UserError as e:
        if only is not None and not isinstance(e, only):
            raise
        raise UserError(f"{e} ({hint})") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: one 'error: ...' line on stderr and exit code 2 (argparse's own
    format prints the usage block first, which buries the message)."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


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


# argparse types. Each returns the parsed value or raises argparse.ArgumentTypeError, which ArgumentParser prints
# as one line naming the flag. Factories (bounded_int, bounded_float) build a type for given bounds, e.g.
#     p.add_argument("--gen_num", type=bounded_int(1, 10_000))
#     p.add_argument("--stop_frac", type=bounded_float(0, 1, low_open=True))     # (0, 1]
#     p.add_argument("--timeout", type=seconds)                                  # (0, 1 day]

MAX_SECONDS = 86400.0  # one day: a longer wait is a typo, and 1e300 s overflows the socket and thread layers
SEED_MAX = 2 ** 63 - 1  # torch generators take 64-bit seeds; above this torch.manual_seed fails


def _show(text):
    """A user's text for a message: repr, cut to 40 characters (a 5,000-digit number stays readable)."""
    r = repr(text)
    return r if len(r) <= 40 else r[:37] + "..."


def _parse_int(text, low, high):
    """An integer in [low, high] (None: unbounded) parsed from text, or an argparse error naming the kind."""
    kind = ("a positive integer" if low == 1 else "a non-negative integer" if low == 0 else
            "an integer" if low is None else f"an integer >= {low}")
    try:
        v = int(text)
    except ValueError:  # also int('9' * 5000): Python refuses over 4,300 digits
        raise_arg(f"expected {kind}, got {_show(text)}")
    if low is not None and v < low:
        raise_arg(f"expected {kind}, got {v}")
    if high is not None and v > high:
        raise_arg(f"expected at most {high}, got {_show(text)}")
    return v


def positive_int(text):
    """argparse type: an integer > 0."""
    return _parse_int(text, 1, None)


def nonneg_int(text):
    """argparse type: an integer >= 0."""
    return _parse_int(text, 0, None)


def seed_int(text):
    """argparse type: a random seed, an integer in [0, 2^63 - 1]."""
    v = _parse_int(text, 0, None)
    if v > SEED_MAX:
        raise_arg(f"a seed must be at most 2^63 - 1, got {_show(text)}")
    return v


def seed_list(text):
    """argparse type: one seed, or comma-separated seeds, none twice (a list of int)."""
    seeds = [seed_int(t.strip()) for t in text.split(",") if t.strip()] or [seed_int(text)]
    if len(set(seeds)) != len(seeds):
        raise_arg(f"seeds must not repeat, got {text!r}")
    return seeds


def bounded_int(low, high=None):
    """argparse type factory: an integer in [low, high] (high None: no upper bound)."""
    def parse(text):
        return _parse_int(text, low, high)

    parse.__name__ = f"integer in [{low}, {high if high is not None else 'inf'}]"
    return parse


def finite_float(text):
    """argparse type: a finite float (no nan or inf)."""
    try:
        v = float(text)
    except ValueError:
        raise_arg(f"expected a number, got {_show(text)}")
    if not math.isfinite(v):
        raise_arg(f"expected a finite number, got {_show(text)}")
    return v


def nonneg_float(text):
    """argparse type: a finite float >= 0."""
    v = finite_float(text)
    if v < 0:
        raise_arg(f"expected a non-negative number, got {v}")
    return v


def positive_float(text):
    """argparse type: a finite float > 0."""
    v = finite_float(text)
    if v <= 0:
        raise_arg(f"expected a positive number, got {v}")
    return v


def bounded_float(low, high, low_open=False, high_open=False):
    """argparse type factory: a finite float in the interval from low to high (None: unbounded on that side);
    low_open/high_open exclude the end point, e.g. bounded_float(0, 1, low_open=True) is (0, 1]."""
    interval = (f"{'(' if low_open else '['}{'-inf' if low is None else f'{low:g}'}, "
                f"{'inf' if high is None else f'{high:g}'}{')' if high_open else ']'}")

    def parse(text):
        v = finite_float(text)
        below = low is not None and (v <= low if low_open else v < low)
        above = high is not None and (v >= high if high_open else v > high)
        if below or above:
            raise_arg(f"expected a number in {interval}, got {_show(text)}")
        return v

    parse.__name__ = f"number in {interval}"
    return parse


def seconds(text):
    """argparse type: a duration in seconds, > 0 and at most one day (MAX_SECONDS)."""
    v = positive_float(text)
    if v > MAX_SECONDS:
        raise_arg(f"at most {MAX_SECONDS:g} s (one day), got {_show(text)}")
    return v


def nonneg_seconds(text):
    """argparse type: a duration in seconds, >= 0 and at most one day (e.g. a back-off before retrying)."""
    v = nonneg_float(text)
    if v > MAX_SECONDS:
        raise_arg(f"at most {MAX_SECONDS:g} s (one day), got {_show(text)}")
    return v


def device_name(text):
    """argparse type: 'cpu', 'cuda', 'cuda:N' or 'auto' (whether CUDA exists is checked later, by
    utils.models.resolve_device)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", text):
        raise_arg(f"expected cpu, cuda or cuda:N, got {_show(text)}")
    return text


def parse_int_list(text, low=None, high=None, what="values"):
    """Sorted unique integers from comma-separated text; a ValueError-free UserError naming `what` otherwise.

    low/high: inclusive bounds (None = unbounded). Returns a list of int.
    """
    try:
        vals = sorted({int(s) for s in str(text).split(",") if s.strip()})
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {_show(text)}")
    if not vals:
        raise UserError(f"{what}: no value given")
    if (low is not None and vals[0] < low) or (high is not None and vals[-1] > high):
        raise UserError(f"{what} must lie in {low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
                        f", got {_show(text)}")
    return vals


def raise_arg(msg):
    raise argparse.ArgumentTypeError(msg)


# ------------------------------------------------------------------------- settings dataclasses as flags

def _field_comments(cls):
    """{field name: its trailing '# comment'} from a dataclass's source, for every class in its MRO."""
    import inspect
    out = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s?(.*)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def settings_arguments(parser, cls, prefix="", title=None, skip=()):
    """Add one flag per field of the settings dataclass `cls` to `parser`: --<prefix><field>, its default the
    field's default (declared once, in the dataclass), its help the field's trailing comment. A field's
    `metadata` may give `flag` (another flag name), `type` (an argparse type; default: from the default value),
    `choices`, `metavar` and `help` (overriding the comment); metadata `cli=False` keeps it off the command line, and
    `negate=True` makes a boolean's flag hold the opposite value, so the parsed flags read as the flag says.
    Returns the list of (field name, argparse dest) added."""
    import dataclasses
    group = parser.add_argument_group(title) if title else parser
    comments = _field_comments(cls)
    added = []
    for f in dataclasses.fields(cls):
        md = f.metadata
        if f.name in skip or md.get("cli", True) is False:
            continue
        flag = md.get("flag", f"--{prefix}{f.name}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(default=default, help=md.get("help", comments.get(f.name, "")))
        if isinstance(default, bool) and "type" not in md:
            if md.get("negate"):  # the flag names the opposite (--ren_no_mask for mask=True): it holds `not field`
                kwargs["default"] = default = not default
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["type"] = md.get("type") or _type_of(default)
            for k in ("choices", "metavar"):
                if k in md:
                    kwargs[k] = md[k]
        dest = flag.lstrip("-").replace("-", "_")
        group.add_argument(flag, dest=dest, **kwargs)
        added.append((f.name, dest))
    return added


def _type_of(default):
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return finite_float
    return str


def settings_from(cls, values, added, **overrides):
    """An instance of the settings dataclass from parsed values (a dict, e.g. vars(args)) and the (field, dest)
    pairs settings_arguments returned; overrides win. A ValueError of the dataclass's own checks becomes a
    UserError (one line)."""
    kwargs = settings_values(cls, values, added)
    kwargs.update(overrides)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


def settings_values(cls, values, added):
    """{field: value} of the settings dataclass `cls` from parsed values (a dict) and the (field, dest) pairs
    settings_arguments returned (a negated flag turned back into its field's value)."""
    import dataclasses
    negated = {f.name for f in dataclasses.fields(cls) if f.metadata.get("negate")}
    return {name: (not values[dest]) if name in negated else values[dest] for name, dest in added}
