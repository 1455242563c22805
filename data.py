"""Problems: the benchmark files under data/ and the problem sets plug-ins generate.

Every benchmark is a JSONL file, one JSON object a line with a `problem` and an `answer` field (see
data/README.md for sources and licences); other fields are kept in `Problem.meta`. Files are read as
UTF-8, a byte-order mark (Windows editors) skipped. `limit` keeps the first N problems of a file, so
subsets are the same on every run; `seed` only matters for generated problems.

A generated problem set comes from a plug-in package listed in PLUGINS (the built-in world,
world/source.py): its `SOURCE`, a `ProblemSource`, says which data names it answers and what the
core may ask of them (their held-out set, strategic grams, model, figures of their own). The core
names no plug-in's functions. Bad input raises InputError with a one-line message naming the file
and line.
"""

import functools
import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cli import InputError

DATA_DIR = Path(__file__).parent / "data"
BENCHMARKS = {
    "gsm8k": "gsm8k_test.jsonl",
    "gsm8k_train": "gsm8k_train.jsonl",
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "amc23": "amc23.jsonl",
    "minerva": "minerva_math.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
}
PLUGINS = ("world",)  # packages whose `source` module holds a SOURCE: ProblemSource


@dataclass
class Problem:
    problem: str
    answer: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ProblemSource:
    """Generated problem sets and what the core asks of them; a plug-in's `source.SOURCE`
    (PLUGINS)."""

    # data name -> (limit, seed) -> problems
    problems: dict[str, Callable[[int | None, int], list[Problem]]]
    held_out: dict[str, str]  # a training set's name -> its held-out set's (--eval-data unset)
    grams_preset: str  # the --grams preset name of `grams`
    grams: tuple[str, ...]  # its strategic grams: --grams unset, for its data
    model: str  # the model its data is written for (--model unset)
    # (flag, data name, model): InputError for a model that can't read it
    check_model: Callable[[str, str, str], None]
    # its own per-step metrics
    batch_figures: Callable[[list[Problem], list[str], list[bool]], dict[str, float]]
    # (n, seed) -> correct solutions: the placebo grams' corpus
    reference_texts: Callable[[int, int], list[str]]


@functools.cache
def problem_sources() -> dict[str, ProblemSource]:
    """Each generated data name -> the ProblemSource that answers it, over PLUGINS (imported on
    first use)."""
    sources = [importlib.import_module(f"{package}.source").SOURCE for package in PLUGINS]
    return {name: source for source in sources for name in source.problems}


def source_of(name: str | None) -> ProblemSource | None:
    """The ProblemSource generating the data set `name`; None for a benchmark file."""
    return problem_sources().get(name) if name else None


def check_data_model(model: str, data_flags: dict[str, str | None]) -> None:
    """InputError when a flag's generated problems ({"--data": name, ...}) cannot be read by `model`
    (ProblemSource.check_model: the built-in world's v1 problems with its v2 model, say)."""
    for flag, name in data_flags.items():
        source = source_of(name)
        if source is not None:
            source.check_model(flag, name, model)


def load_problems(name_or_path: str, limit: int | None = None, seed: int = 0,
                  flag: str | None = None) -> list[Problem]:
    """Problems of a benchmark name (BENCHMARKS), a generated set's name (problem_sources) or a
    JSONL path.

    `flag` (e.g. "--data") prefixes any InputError, so the message names the flag as well as file
    and line.
    """
    if limit is not None and limit < 1:
        # the scripts check their flags up front
        raise ValueError(f"limit must be at least 1, got {limit}")
    try:
        source = source_of(name_or_path)
        if source is not None:
            return source.problems[name_or_path](limit, seed)
        return read_jsonl(resolve_benchmark(name_or_path))[:limit]
    except InputError as error:
        raise InputError(f"{flag}: {error}" if flag else str(error)) from None


def resolve_benchmark(name_or_path: str) -> Path:
    """The file behind a benchmark name, or the path itself if it names a file."""
    if name_or_path in BENCHMARKS:
        return DATA_DIR / BENCHMARKS[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".jsonl" or path.parent != Path(".") or path.is_file():
        return path
    valid = ", ".join([*BENCHMARKS, *problem_sources()])
    raise InputError(f"unknown benchmark {name_or_path!r}; valid names: {valid} (or a path to a "
                     ".jsonl file)")


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, a leading byte-order mark dropped; InputError naming file and
    line for a missing file, a folder, or bytes that are not UTF-8 (e.g. a file saved as
    Latin-1)."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None
    # not splitlines(): a JSON string may hold U+2028 and other line separators
    return text.split("\n")


def read_json(text: str, where: str):
    """json.loads, with an InputError naming `where` (FILE or FILE:LINE) for text that is not JSON,
    that Python cannot hold (an integer of more digits than it converts, nesting deeper than its
    recursion limit), or whose strings are not text (a lone surrogate escape such as \\ud800, which
    no tokenizer takes)."""
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: a string holds {e.object[e.start:e.end]!r}, a lone surrogate "
                         "escape, not text") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: malformed JSON ({e.msg})") from None
    except ValueError as e:  # sys.get_int_max_str_digits
        raise InputError(f"{where}: unreadable JSON ({str(e).splitlines()[0][:80]})") from None
    except RecursionError:
        raise InputError(f"{where}: unreadable JSON (nested too deeply)") from None


def check_line_length(line: str, where: str, what: str) -> None:
    """InputError for a line over MAX_LINE_CHARS, before it is parsed: no model reads it whole."""
    if len(line) > MAX_LINE_CHARS:
        raise InputError(f"{where}: a line of {len(line):,} characters, over the "
                         f"{MAX_LINE_CHARS:,} {what} may have")


def jsonl_values(path: Path, what: str) -> Iterator[tuple[str, object]]:
    """(FILE:LINE, parsed JSON) of each non-blank line of a JSONL file (read_text_lines, read_json);
    a line over MAX_LINE_CHARS is refused before it is parsed, as longer than `what` ("a problem")
    may be."""
    for lineno, line in enumerate(read_text_lines(path), start=1):
        if line.strip():
            where = f"{path}:{lineno}"
            check_line_length(line, where, what)
            yield where, read_json(line, where)


def read_jsonl(path: Path) -> list[Problem]:
    """Parse a problems file; blank lines are skipped, anything else malformed is an InputError."""
    problems = [parse_problem(row, where) for where, row in jsonl_values(path, "a problem")]
    if not problems:
        raise InputError(f"{path}: file is empty")
    return problems


MAX_LINE_CHARS = 100_000  # a problem or example line longer than this is refused before parsing


def parse_problem(row, where: str) -> Problem:
    """One JSONL line's value -> Problem; `where` ("FILE:LINE") prefixes any error."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object with 'problem' and 'answer'")
    for key in ("problem", "answer"):
        if key not in row or row[key] is None:
            raise InputError(f"{where}: missing field {key!r}")
        if isinstance(row[key], bool) or not isinstance(row[key], (str, int, float)):
            raise InputError(f"{where}: field {key!r} must be a string or a number, "
                             f"got {type(row[key]).__name__}")
        if not str(row[key]).strip():
            raise InputError(f"{where}: field {key!r} is empty")
    meta = {k: v for k, v in row.items() if k not in ("problem", "answer")}
    return Problem(problem=str(row["problem"]), answer=str(row["answer"]), meta=meta)


def read_examples(path: str) -> list[tuple[str, str]]:
    """Few-shot examples: a JSONL file of objects with `problem` and `solution` (the full worked
    answer, in the format the prompt should teach). Errors name the flag, the file and the line."""
    examples = []
    try:
        for where, row in jsonl_values(Path(path), "an example"):
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                                    for k in ("problem", "solution")):
                raise InputError(f"{where}: expected a JSON object with string fields 'problem' "
                                 "and 'solution'")
            examples.append((row["problem"], row["solution"]))
        if not examples:
            raise InputError(f"{path}: file is empty")
    except InputError as error:
        raise InputError(f"--few-shot: {error}") from None
    return examples
