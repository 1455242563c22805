"""Command-line plumbing shared by the scripts: one-line errors, numeric flag checks, colour on
terminals.

Every input a user can get wrong ends in one line `error: ...` on stderr that names the flag, file
and line, with exit code 2 (USAGE_ERROR), and no traceback:
- argparse's own errors (unknown flag, `--steps abc`) come out of OneLineParser without the usage
  block;
- numbers are checked up front, before any file is written, against a table of bounds per script
  (`check_bounds`): finite (argparse's `float` accepts "nan" and "inf") and in range;
- files (data, grams) and model folders raise cli.InputError where they are read (data.py, grams.py,
  model_loading.load_model); each script's `main` prints it as the one line.
"""

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path


class InputError(ValueError):
    """Bad user input; the message is one line: "FILE:LINE: what is wrong" or "--flag: ..."."""


USAGE_ERROR = 2  # exit code of every bad-input error, as argparse uses for a bad command line
SEED_LIMIT = 2**32  # numpy's seeds are in [0, 2**32)

# A bound is (what it says, the test): the value must also be finite.
Bound = tuple[str, Callable[[float], bool]]
POSITIVE: Bound = ("> 0", lambda v: v > 0)
NON_NEGATIVE: Bound = (">= 0", lambda v: v >= 0)
AT_LEAST_ONE: Bound = (">= 1", lambda v: v >= 1)
UNIT_INTERVAL: Bound = ("in [0, 1]", lambda v: 0 <= v <= 1)
FRACTION: Bound = ("in (0, 1]", lambda v: 0 < v <= 1)
SEED: Bound = (f"in [0, {SEED_LIMIT - 1}]", lambda v: 0 <= v < SEED_LIMIT)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error: ...` line instead of the usage
    block."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"error: {message} (see --help)\n")


def parser_with_commands(description: str) -> tuple[OneLineParser,
                                                   Callable[[str, str], OneLineParser]]:
    """A OneLineParser whose first argument names a command, and `add(name, help)` adding one
    command's parser; both show defaults in --help."""
    parser = OneLineParser(description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> OneLineParser:
        return commands.add_parser(name, help=help,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    return parser, add


def suppress_defaults(parser: argparse.ArgumentParser) -> None:
    """Make `parser` report only the flags given on the command line (how train.py and eval.py tell
    a flag given from a default): every default becomes SUPPRESS and nothing is required; --help
    still shows the defaults."""
    for action in parser._actions:
        # what ArgumentDefaultsHelpFormatter adds
        if action.help and action.default is not argparse.SUPPRESS:
            action.help += f" (default: {str(action.default).replace('%', '%%')})"
        action.default, action.required = argparse.SUPPRESS, False


def flag_name(dest: str) -> str:
    """The command-line spelling of an argparse destination: lora_rank -> --lora-rank."""
    return "--" + dest.replace("_", "-")


def check_bounds(args: argparse.Namespace, bounds: dict[str, Bound]) -> None:
    """Raise InputError for the first flag in `bounds` whose value is not a finite number within its
    bound.

    A value of None (flag not set, e.g. eval.py's --limit) is left alone. Values may come from a
    resumed run's config.json, so the type is checked too.
    """
    for dest, (wanted, holds) in bounds.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{flag_name(dest)}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"{flag_name(dest)}: must be a finite number {wanted}, got {value}")
        if not holds(value):
            raise InputError(f"{flag_name(dest)}: must be {wanted}, got {value}")


def check_text(settings) -> None:
    """Raise InputError for the first string setting (or string in a list setting) that is not text
    a tokenizer can take: bytes that were not UTF-8 on the command line (`--instruction $'\\xff'`,
    which Python keeps as surrogate escapes) or a lone surrogate from a JSON or YAML escape
    (\\ud800)."""
    for dest, value in vars(settings).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise InputError(f"{flag_name(dest)}: not valid text: character {error.start} "
                                     f"is {item[error.start]!r} (bytes that are not UTF-8, or a "
                                     f"lone surrogate escape)") from None


def check_output_file(path: str, flag: str) -> None:
    """Raise InputError unless `path` can be written as a file: not a folder, in a folder that
    exists."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag}: {path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise InputError(f"{flag}: {path}: folder {target.parent} does not exist")


def use_colour(stream) -> bool:
    """ANSI colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


# C0 and C1 control characters (ESC, CSI, ...) but newline and tab, each shown as one visible
# character.
CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421} | {
    c: 0xFFFD for c in range(0x80, 0xA0)}


def visible(text: str) -> str:
    """`text` with its control characters shown as symbols (ESC -> U+241B), one character for one,
    so text from a data file or a model cannot drive the terminal, and character offsets into it
    still hold."""
    return text.translate(CONTROL_PICTURES)


def report(error: InputError) -> int:
    """Print a bad-input error as its one line on stderr; returns the exit code."""
    print(f"error: {error}", file=sys.stderr)
    return USAGE_ERROR


# ---------------------------------------------------------- a run's end: one line and an exit code


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite training, a reward that always fails); the message is one
    line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill` stopping the run): handled as Ctrl-C is."""


def stop_once(signum, frame) -> None:
    """The first SIGINT (Ctrl-C) or SIGTERM stops the run (KeyboardInterrupt / Terminated); any
    later one is ignored while it stops, so a second Ctrl-C a millisecond later cannot break the
    cleanup into a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def escape_unprintable_output() -> None:
    """Text stdout or stderr cannot encode (a problem's non-ASCII text on an ASCII terminal) is
    escaped, not a crash."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def run_to_exit_code(work: Callable[[], object], resume_hint: Callable[[], str | None]) -> None:
    """Run `work`, ending every failure in one line on stderr and an exit code (docs/failures.md):
    2 bad input (InputError), 1 a run that had to stop (TrainingError) or could not write (OSError:
    disk full, no permission), 130 Ctrl-C, 143 SIGTERM, 141 the reader of stdout left.
    `resume_hint()` is the command that continues the run, or None when there is nothing to
    continue."""
    previous = signal.signal(signal.SIGTERM, stop_once)
    signal.signal(signal.SIGINT, stop_once)
    try:
        work()
    except KeyboardInterrupt as error:
        # An object the interrupt left half-built (a progress bar) fails in its destructor while the
        # process exits: "Exception ignored in ..." with a traceback. Stopping on purpose, that is
        # noise.
        sys.unraisablehook = lambda unraisable: None
        hint = resume_hint()
        if hint:
            print(f"\ninterrupted: continue with  {hint}", file=sys.stderr)
        sys.exit(143 if isinstance(error, Terminated) else 130)
    except InputError as error:
        sys.exit(report(error))
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    # `python train.py | head`: the reader left; stop quietly, as Unix tools do
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as error:  # the last complete checkpoint stands
        where = f"{error.filename}: " if error.filename else ""
        hint = resume_hint()
        print(f"error: {where}{error.strerror or error}"
              + (f"; continue with  {hint}" if hint else ""), file=sys.stderr)
        sys.exit(1)
    else:
        # Python's own, for a caller that goes on
        signal.signal(signal.SIGINT, signal.default_int_handler)
    finally:
        signal.signal(signal.SIGTERM, previous)
