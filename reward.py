"""Rewards: grade a completion's final answer against the reference answer.

A reward function is a plain callable `(completion_text, reference_answer) -> float`.
Choices, and where they come from:
- Strict boxed grading (paper Sec. 5, "strict \\boxed{} answer matching"): only the
  last complete `\\boxed{...}` of the completion counts; a completion without one
  scores 0. `\\boxed X` (no braces, as in `\\boxed 5`) is accepted too.
- Equivalence is decided by math-verify (`parse` + `verify`), so `\\frac{1}{2}` equals
  `0.5`, `\\text{(C)}` equals `C`, `\\left( 3, \\frac{\\pi}{2} \\right)` equals
  `(3, \\pi/2)`. Plain numbers (`1,000`, `18.00`) are compared exactly in-process
  first; math-verify only sees the rest.
- Timeouts: math-verify's own timeouts use `signal.alarm`, which only works on the
  main thread, so they are disabled here. Each math-verify comparison runs in a
  forked child process that is killed after `timeout_s`; a timeout raises
  `GradingTimeout` (the completion scores 0 and grading.grade reports it as a timeout).
  A process, not a thread, because a runaway sympy computation cannot be stopped
  from another thread and would keep eating CPU.
- grading.py runs a reward over a batch, several completions at a time (threads that
  each wait on their child process) under one deadline for the batch, and counts a
  reward that raises, times out or returns no sane number as a scored-0 failure. A
  custom reward function must therefore be safe to call from several threads at once
  (pure functions are).
- `gsm8k_reward` is the lenient GSM8K grader: the boxed answer if there is one,
  else the last number of the text, compared as a number.
- Model output is only parsed, never executed.
"""

import importlib
import importlib.util
import logging
import multiprocessing
import re
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from math_verify import parse, verify

from cli import InputError

DEFAULT_TIMEOUT_S = 5.0
# "fork" keeps a comparison cheap (~20 ms): the child inherits math-verify's parsers.
FORK = multiprocessing.get_context("fork")
# A number as written in an answer: thousands commas only in groups of three.
NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
# Decoration that never changes a numeric answer: $, \$, spaces, thin spaces, \%.
NUMBER_NOISE_RE = re.compile(r"\\\$|\$|\\[,!; ]|\\%|%|\s")


class GradingTimeout(Exception):
    """A math-verify comparison ran past its time limit (scored as wrong)."""


def extract_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (brace matched) or \\boxed X; None if none.

    Escaped braces `\\{` `\\}` do not count for matching. A box left open (for example
    a completion cut at max_new_tokens) is skipped, so an earlier closed box counts.
    """
    answer = None
    for start in (m.end() for m in re.finditer(r"\\boxed", text)):
        content = _box_content(text, start)
        if content is not None:
            answer = content
    return answer


def _box_content(text: str, start: int) -> str | None:
    """Argument of the \\boxed command whose name ends at `start`, or None if unclosed/empty."""
    rest = text[start:]
    if not rest.startswith("{"):
        # `\boxed 5`: one space-separated token, up to a `$` or whitespace.
        m = re.match(r" +([^\s$]+)", rest)
        if m is None:
            return None
        return m.group(1).rstrip(".,") or None
    depth, i = 0, 0
    while i < len(rest):
        char = rest[i]
        if char == "\\":
            i += 2  # skip the escaped character (\{ and \} are literal braces)
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip() or None
        i += 1
    return None


def parse_number(text: str) -> Decimal | None:
    """`text` as a number if it is only a number (`1,000`, `$18.00`, `50\\%`), else None."""
    cleaned = NUMBER_NOISE_RE.sub("", text)
    if not NUMBER_RE.fullmatch(cleaned):
        return None
    try:
        return Decimal(cleaned.replace(",", ""))
    except InvalidOperation:
        return None


def answers_match(pred: str, reference: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True if `pred` is mathematically equal to `reference`.

    Plain numbers compare exactly here; anything else goes to math-verify in a child
    process (see module docstring). Raises GradingTimeout after `timeout_s` seconds.
    """
    if pred.strip() == reference.strip():
        return True
    pred_number, ref_number = parse_number(pred), parse_number(reference)
    if pred_number is not None and ref_number is not None:
        return pred_number == ref_number
    return _verify_in_child(pred, reference, timeout_s)


def _math_verify(pred: str, reference: str) -> bool:
    """math-verify with its signal-based timeouts off; both sides read as inline LaTeX."""
    gold = parse(f"${reference.replace('$', '')}$", parsing_timeout=None)
    target = parse(f"${pred.replace('$', '')}$", parsing_timeout=None)
    return verify(gold, target, timeout_seconds=None)


def _child_verify(conn, pred: str, reference: str) -> None:
    """Child-process body: send the verdict back through the pipe."""
    conn.send(_math_verify(pred, reference))
    conn.close()


def _verify_in_child(pred: str, reference: str, timeout_s: float) -> bool:
    """Run _math_verify in a forked process; kill it and raise GradingTimeout when late."""
    receiver, sender = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_child_verify, args=(sender, pred, reference), daemon=True)
    child.start()
    sender.close()  # so recv() sees EOF if the child dies without answering
    try:
        if not receiver.poll(timeout_s):
            raise GradingTimeout(f"grading took over {timeout_s:g} s: {pred[:80]!r} "
                                 f"vs {reference!r}")
        try:
            return receiver.recv()
        except EOFError:
            raise RuntimeError(f"grader process died (exit code {child.exitcode})") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()


def boxed_reward(completion: str, answer: str) -> float:
    """1.0 if the last \\boxed{} of the completion equals the answer, else 0.0 (strict)."""
    pred = extract_boxed(completion)
    return float(pred is not None and answers_match(pred, answer))


def gsm8k_reward(completion: str, answer: str) -> float:
    """1.0 if the final number equals the answer: the boxed answer if any, else the last number."""
    pred = extract_boxed(completion)
    if pred is None:
        numbers = NUMBER_RE.findall(completion)
        pred = numbers[-1] if numbers else None
    elif parse_number(pred) is None:
        # "18 dollars", "x = 18": keep the last number in the box.
        numbers = NUMBER_RE.findall(pred)
        pred = numbers[-1] if numbers else pred
    return float(pred is not None and answers_match(pred, answer))


def format_reward(completion: str, answer: str) -> float:
    """1.0 if the completion holds a complete, non-empty \\boxed{} answer; ignores `answer`."""
    return float(extract_boxed(completion) is not None)


REWARDS = {"boxed": boxed_reward, "gsm8k": gsm8k_reward, "format": format_reward}
REWARD_HELP = (
    f"reward function: a built-in ({', '.join(sorted(REWARDS))}) or your own callable as "
    "module:function (an importable module or a .py file path; called as fn(completion, answer) "
    "-> float)"
)


def load_reward(spec: str):
    """The reward callable named by --reward: a REWARDS key, `module:function` or
    `path/to/file.py:function`.

    Raises InputError with a one-line message naming the flag for an unknown name, a module that
    does not import, a missing attribute or an attribute that is not callable.
    """
    if spec in REWARDS:
        return REWARDS[spec]
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise InputError(f"--reward: unknown reward {spec!r}; built-in: "
                         f"{', '.join(sorted(REWARDS))}, or module:function")
    # a module that parses the command line at import sees none of ours
    argv, sys.argv = sys.argv, [module_name]
    try:
        module = _import_reward_module(module_name)
    except SystemExit as stop:  # e.g. argparse's exit from that module
        raise InputError(f"--reward: importing {module_name!r} exited ({stop.code}); a reward "
                         "module must not parse the command line or exit when imported") from None
    except Exception as error:  # the user's module may fail in any way while importing
        message = str(error).splitlines()[0] if str(error) else ""
        raise InputError(f"--reward: cannot import {module_name!r}: "
                         f"{type(error).__name__}: {message}") from None
    finally:
        sys.argv = argv
    if not hasattr(module, attribute):
        raise InputError(f"--reward: module {module_name!r} has no attribute {attribute!r}")
    fn = getattr(module, attribute)
    if not callable(fn):
        raise InputError(f"--reward: {spec!r} is not callable (it is a {type(fn).__name__})")
    return fn


def _import_reward_module(name: str):
    """Import a module by dotted name, or load it from a .py file path."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no such file {name}")
    # Registered under its own name (a dataclass in the file needs sys.modules), never shadowing a
    # real module.
    spec = importlib.util.spec_from_file_location(f"user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# math-verify warns that its timeouts are off; this module times comparisons itself.
logging.getLogger("math_verify").setLevel(logging.ERROR)
# Build math-verify's parsers once in this process, so forked graders inherit them
# instead of rebuilding them on every comparison (~50 ms each).
_math_verify("1", "\\frac{1}{2}")
