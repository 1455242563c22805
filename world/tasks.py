"""The built-in reasoning world: small verifiable word problems where the strategy decides success.

Each problem family has two ways to be solved, announced by a planning phrase at the start of the
trace, followed by the operands copied from the problem ("the numbers are 47, 6") and the strategy's
equations:

- `steps`  (sound): break the problem into one small operation per line, e.g.
      "let's break it into parts. the numbers are 47, 6. 40 * 6 = 240. 7 * 6 = 42. 240 + 42 = 282.
       so the answer is \\boxed{282}."
- `direct` (poor):  do everything in one long step, e.g.
      "let's multiply in one step. the numbers are 47, 6. 47 * 6 = 282. so the answer is
       \\boxed{282}."
- `check`  (sound): the direct step, then "let me check:" redoes it in small steps and either
      confirms it ("that is right.") or catches the slip ("wait, that is wrong.") and answers with
      the checked value.

All are valid, but a tiny model executes the small steps more reliably: one long step is beyond its
capacity, so `direct` fails more often *by itself*; no error is injected at sampling time. The base
model (tiny_model.py) is fine-tuned on a mix where `direct` dominates, so reinforcement learning has
a strategy to discover (the planning phrase of `steps` or `check`), which is what HICRA credits
(paper Sec. 3); and its teacher was fallible (it misread operands and slipped on results now and
then, `written_trace` with `slip_writer`), so the model's own execution is imperfect under every
strategy and can be consolidated. docs/world.md gives the measured strategy gap and base accuracies.

Families: `sum` (four 2-digit numbers), `mul` (2-digit times 1-digit), `packs` (a*b + c*d, one-digit
factors). Train and test problems are disjoint by their operands (a fixed hash splits the operand
space), so test arithmetic was never seen verbatim during fine-tuning.

Two versions of the world are kept, one per regime the paper names (docs/world.md):
- `v2` (the default; data names `world`, `world_train`; model models/tiny-world): execution is
  improvable (a fallible teacher, the operand copy), so RL can consolidate execution before it
  explores strategy.
- `v1` (data names `world_v1`, `world_v1_train`; model models/tiny-world-v1): execution is already
  reliable (an exact teacher, no operand copy; third family `change`, a + b - c, with no strategy
  gap), the regime in which the paper expects HICRA to help. Its model was built by tiny_model.py as
  of commit f605995 (`git show f605995:tiny_model.py`); today's tiny_model.py builds v2 only.
"""

import json
import random
import re
import zlib
from pathlib import Path

from cli import InputError, check_output_file, parser_with_commands
from data import Problem
from run_folder import write_atomically

# the families of each version
WORLDS = {"v2": ("sum", "mul", "packs"), "v1": ("sum", "mul", "change")}
FAMILIES = WORLDS["v2"]
STRATEGIES = ("direct", "steps", "check")
SPLITS = ("train", "test")
# the base model tiny_model.py builds
MODEL_DIRS = {"v2": str(Path(__file__).parent / "models" / "tiny-world"),
              "v1": str(Path(__file__).parent / "models" / "tiny-world-v1")}
DEFAULT_MODEL_DIR = MODEL_DIRS["v2"]
# The data names of the world's problem sets (world/source.py): (split, default n, world version).
WORLD_SPLITS = {"world": ("test", 500, "v2"), "world_train": ("train", 10_000, "v2"),
                "world_v1": ("test", 500, "v1"), "world_v1_train": ("train", 10_000, "v1")}
TEST_PERCENT = 20  # share of each family's operand space held out for the test split

# Planning phrases: the plan that opens a trace, per family and strategy (`check` opens like
# `direct`).
PLANS = {
    "sum": {"steps": "let's add them one at a time", "direct": "let's add them all at once"},
    "mul": {"steps": "let's break it into parts", "direct": "let's multiply in one step"},
    "packs": {"steps": "let's go step by step", "direct": "let's do it in one step"},
    "change": {"steps": "let's go step by step", "direct": "let's do it in one step"},  # world v1
}
CHECK = "let me check"
CHECK_OK = "that is right"
CHECK_WRONG = "wait, that is wrong"
CONCLUDE = "so the answer is"
RESTATE = "the numbers are"  # execution text: the operands copied before any equation

# The world's strategic grams (grams preset "world"): every planning phrase above, lower-case.
WORLD_GRAMS = sorted({plan for plans in PLANS.values() for plan in plans.values()}
                     | {CHECK, CHECK_OK, CHECK_WRONG, CONCLUDE})

NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana")
ITEMS = ("apples", "coins", "books", "pens", "shells", "stamps", "cards", "stones")

BOXED_INT = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def family_operands(family: str, rng: random.Random) -> tuple[int, ...]:
    """Draw the operands of one problem of `family`."""
    if family == "sum":
        return tuple(rng.randint(10, 99) for _ in range(4))
    if family == "mul":
        tens, units = rng.randint(1, 9), rng.randint(1, 9)  # units > 0 so the split has two parts
        return (10 * tens + units, rng.randint(3, 9))
    if family == "packs":
        return tuple(rng.randint(2, 9) for _ in range(4))
    if family == "change":
        a, b = rng.randint(20, 99), rng.randint(20, 99)
        return (a, b, rng.randint(10, a + b - 10))
    raise ValueError(f"unknown family '{family}' (known: {', '.join(FAMILIES)})")


def solve(family: str, ops: tuple[int, ...]) -> int:
    """The exact answer of a problem."""
    if family == "sum":
        return sum(ops)
    if family == "mul":
        return ops[0] * ops[1]
    if family == "change":
        return ops[0] + ops[1] - ops[2]
    return ops[0] * ops[1] + ops[2] * ops[3]


def problem_text(family: str, ops: tuple[int, ...], name: str, item: str) -> str:
    """The natural-language statement of a problem."""
    if family == "sum":
        a, b, c, d = ops
        return (f"{name} has four boxes with {a}, {b}, {c} and {d} {item}. "
                f"How many {item} are there in total?")
    if family == "mul":
        a, b = ops
        return (f"{name} buys {a} bags of {item}. Each bag holds {b} {item}. "
                f"How many {item} does {name} buy?")
    if family == "change":
        a, b, c = ops
        return (f"{name} has {a} {item}, gets {b} more and then gives away {c}. "
                f"How many {item} does {name} have now?")
    a, b, c, d = ops
    return (f"{name} buys {a} packs of {b} {item} and {c} packs of {d} {item}. "
            f"How many {item} does {name} buy?")


def split_of(family: str, ops: tuple[int, ...]) -> str:
    """The split ("train" or "test") that owns these operands: a fixed hash, independent of any
    seed."""
    key = f"{family}:{','.join(map(str, ops))}".encode()
    return "test" if zlib.crc32(key) % 100 < TEST_PERCENT else "train"


def world_problems(split: str, n: int, seed: int, world: str = "v2") -> list[Problem]:
    """`n` problems of `split` in world version `world` (WORLDS), deterministic for `seed`; the two
    splits never share operands.

    meta: family, operands (list of ints), split, and world for v1 (whose traces do not copy the
    operands).
    """
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got '{world}'")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{split}:{seed}")
    problems = []
    while len(problems) < n:
        family = rng.choice(WORLDS[world])
        ops = family_operands(family, rng)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        if split_of(family, ops) != split:
            continue
        meta = ({"family": family, "operands": list(ops), "split": split}
                | ({"world": world} if world != "v2" else {}))
        problems.append(Problem(problem=problem_text(family, ops, name, item),
                                answer=str(solve(family, ops)), meta=meta))
    return problems


def check_world_model(model: str, data_flags: dict[str, str]) -> None:
    """InputError when a flag's world problems ({"--data": name, ...}) would go to the shipped model
    of the other world version: its tokenizer lacks the other world's words, so the run would
    measure nothing."""
    for flag, name in data_flags.items():
        world = WORLD_SPLITS[name][2] if name in WORLD_SPLITS else None
        for other, folder in MODEL_DIRS.items():
            if world and other != world and Path(model).resolve() == Path(folder).resolve():
                wanted = Path(MODEL_DIRS[world]).relative_to(Path(__file__).parents[1])
                raise InputError(f"{flag} {name}: world {world} problems, but --model {model} is "
                                 f"world {other}'s model; use --model {wanted}")


def exact(value: int) -> int:
    """The identity: how an infallible solver writes a result."""
    return value


def step_equations(family: str, ops: tuple[int, ...], write=exact) -> list[str]:
    """The small steps of the `steps` strategy, one operation each.

    write(value) -> the value actually written for each result; a later step builds on the written
    value, so a slip (see `slip_writer`) carries forward to the end of the trace, as it would on
    paper.
    """
    lines = []

    def step(left: str, value: int) -> int:
        written = write(value)
        lines.append(f"{left} = {written}")
        return written

    if family == "sum":
        total = ops[0]
        for x in ops[1:]:
            total = step(f"{total} + {x}", total + x)
    elif family == "mul":
        a, b = ops
        tens, units = a - a % 10, a % 10
        x, y = step(f"{tens} * {b}", tens * b), step(f"{units} * {b}", units * b)
        step(f"{x} + {y}", x + y)
    elif family == "change":
        a, b, c = ops
        s = step(f"{a} + {b}", a + b)
        step(f"{s} - {c}", s - c)
    else:
        a, b, c, d = ops
        x, y = step(f"{a} * {b}", a * b), step(f"{c} * {d}", c * d)
        step(f"{x} + {y}", x + y)
    return lines


def direct_equation(family: str, ops: tuple[int, ...], result: int) -> str:
    """The one long step of the `direct` strategy, with the given (possibly wrong) result."""
    if family == "sum":
        return f"{' + '.join(map(str, ops))} = {result}"
    if family == "mul":
        return f"{ops[0]} * {ops[1]} = {result}"
    if family == "change":
        return f"{ops[0]} + {ops[1]} - {ops[2]} = {result}"
    return f"{ops[0]} * {ops[1]} + {ops[2]} * {ops[3]} = {result}"


def slipped(value: int, rng: random.Random) -> int:
    """A plausible arithmetic slip near `value` (off by one, by ten, or a carry missed)."""
    return max(1, value + rng.choice((-10, -1, 1, 10, 100 if value >= 100 else 20)))


def miscopied(value: int, rng: random.Random) -> int:
    """A plausible misreading of an operand: one digit off by one (units, or tens when there are
    tens)."""
    step = rng.choice((1, 10)) if value >= 10 else 1
    return max(1, value + rng.choice((-step, step)))


def slip_writer(rng: random.Random, slip_rate: float, slip=slipped):
    """write(value) for a fallible solver: each value goes through slip(value, rng) with probability
    `slip_rate` (`slipped` for results, `miscopied` for operands)."""
    return lambda value: slip(value, rng) if rng.random() < slip_rate else value


def last_result(equation: str) -> int:
    """The number after the last "= " of an equation line."""
    return int(equation.rsplit("= ", 1)[1])


def restatement(ops: tuple[int, ...]) -> str:
    """The line that copies a problem's operands, right after the plan: "the numbers are 47, 38, 12,
    90"."""
    return f"{RESTATE} {', '.join(map(str, ops))}"


def written_trace(problem: Problem, strategy: str, write=exact, first_slip: bool = False,
                  rng: random.Random | None = None, copy=exact) -> str:
    """A trace of `problem` with `strategy`: the plan, the operands as copied (copy(x) for each),
    the strategy's equations on the copied operands with every result going through write(value),
    the answer.

    The answer is what the trace computed: with write=copy=exact it is right; with a fallible writer
    or copier (`slip_writer`) it is wrong whenever a slip reaches the end, under any strategy.
    first_slip (strategy "check" only): the direct step holds a slip drawn from `rng`, for the check
    to catch. The check compares its own small-step result with the direct one: "that is right." if
    they agree, else "wait, that is wrong." and the checked value is the answer.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
    if first_slip and strategy != "check":
        raise ValueError("slip=True needs strategy 'check' (only a check can catch a slip)")
    family = problem.meta["family"]
    ops = tuple(copy(x) for x in problem.meta["operands"])
    # v1 traces copy nothing
    copied = [restatement(ops)] if problem.meta.get("world", "v2") == "v2" else []
    if strategy == "steps":
        steps = step_equations(family, ops, write)
        body, answer = [PLANS[family]["steps"], *copied, *steps], last_result(steps[-1])
    else:
        value = solve(family, ops)
        first = slipped(value, rng or random.Random(0)) if first_slip else write(value)
        body, answer = [PLANS[family]["direct"], *copied,
                        direct_equation(family, ops, first)], first
        if strategy == "check":
            steps = step_equations(family, ops, write)
            answer = last_result(steps[-1])
            body += [f"{CHECK}: {', '.join(steps)}", CHECK_OK if answer == first else CHECK_WRONG]
    return ". ".join(body) + f". {CONCLUDE} \\boxed{{{answer}}}."


def reference_trace(problem: Problem, strategy: str, slip: bool = False, seed: int = 0) -> str:
    """A correct solution trace of `problem` with `strategy`, ending with \\boxed{answer}.

    slip=True (strategy "check" only): the direct step contains a slip that the check catches
    ("wait, that is wrong.") before the corrected answer.
    """
    return written_trace(problem, strategy, exact, first_slip=slip, rng=random.Random(seed))


def boxed_answer(completion: str) -> str | None:
    """The integer in the last \\boxed{...} of a completion, or None."""
    found = BOXED_INT.findall(completion)
    return found[-1] if found else None


def detect_strategy(problem: Problem, completion: str) -> str | None:
    """The strategy a completion follows, read from its opening plan; None if the plan is
    missing/foreign."""
    plans = PLANS[problem.meta["family"]]
    opening = completion.strip().lower()
    if opening.startswith(plans["steps"]):
        return "steps"
    if opening.startswith(plans["direct"]):
        return "check" if CHECK in opening else "direct"
    return None


def classify_error(problem: Problem, completion: str) -> str | None:
    """None if the completion is correct, else "strategy" or "execution" (the paper's Fig. 5 split).

    strategy error: the poor one-shot plan (`direct` without a check), or a missing / foreign plan;
    execution error: a sound plan (`steps` or `check`) that went wrong in its arithmetic, in copying
    an operand, or in writing the final box.
    """
    if boxed_answer(completion) == problem.answer:
        return None
    return "execution" if detect_strategy(problem, completion) in ("steps", "check") else "strategy"


# Arithmetic drill for real pretrained models (docs/real_model.md): "What is 47 + 38?",
# held out by the same operand hash as the world, with a worked solution for few-shot prompts.
DRILL_RANGE = (10, 99)  # both addends are two-digit numbers


def drill_problems(split: str, n: int, seed: int) -> list[Problem]:
    """`n` distinct addition problems of `split` ("What is a + b?"), deterministic for `seed`; meta
    holds the worked `solution` (tens, then ones, then their sum, then the boxed answer), usable as
    a few-shot example."""
    low, high = DRILL_RANGE
    available = sum(split_of("add", (a, b)) == split for a in range(low, high + 1)
                    for b in range(low, high + 1))
    if n > available:
        raise ValueError(f"the {split} split has {available} distinct drill problems, {n} asked")
    rng = random.Random(f"drill:{split}:{seed}")
    problems, seen = [], set()
    while len(problems) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if split_of("add", (a, b)) == split and (a, b) not in seen:
            seen.add((a, b))
            problems.append(Problem(problem=f"What is {a} + {b}?", answer=str(a + b),
                                    meta={"solution": drill_solution(a, b)}))
    return problems


def drill_solution(a: int, b: int) -> str:
    """The worked solution of a + b: "Let's add the tens and the ones. 40 + 30 = 70. 7 + 8 = 15.
    70 + 15 = 85. So the answer is \\boxed{85}." (it opens and closes with Listing 1 grams: "let's",
    "so")."""
    tens, ones = a - a % 10 + b - b % 10, a % 10 + b % 10
    steps = [f"{a - a % 10} + {b - b % 10} = {tens}", f"{a % 10} + {b % 10} = {ones}",
             f"{tens} + {ones} = {a + b}"]
    return ("Let's add the tens and the ones. " + ". ".join(steps)
            + f". So the answer is \\boxed{{{a + b}}}.")


def write_drill(path: str, split: str, n: int, seed: int) -> None:
    """A JSONL file of `n` drill problems (problem, answer, solution): train.py/eval.py data or
    --few-shot file."""
    write_atomically(Path(path), "".join(json.dumps({"problem": p.problem, "answer": p.answer,
                                                     "solution": p.meta["solution"]}) + "\n"
                                         for p in drill_problems(split, n, seed)))


def reference_traces(n: int, seed: int) -> list[Problem]:
    """`n` train problems, each with a correct reference trace in meta["solution"]: strategies drawn
    uniformly, half of the `check` traces with a caught slip."""
    rng = random.Random(seed)
    problems = []
    for problem in world_problems("train", n, seed):
        strategy = rng.choice(STRATEGIES)
        slip = strategy == "check" and rng.random() < 0.5
        trace = reference_trace(problem, strategy, slip=slip, seed=rng.randrange(2**31))
        problems.append(Problem(problem.problem, problem.answer, {"solution": trace}))
    return problems


def write_traces(path: str, n: int, seed: int) -> None:
    """A JSONL corpus of `n` reference traces (problem, answer, solution): the input of `python -m
    gram_sets.extraction extract` for the world."""
    write_atomically(Path(path),
                     "".join(json.dumps({"problem": p.problem, "answer": p.answer, **p.meta}) + "\n"
                             for p in reference_traces(n, seed)))


def main() -> None:
    parser, add_command = parser_with_commands("The built-in world: write a corpus of reference "
                                               "traces.")
    traces = add_command("traces", "write N reference traces as JSONL (problem, answer, solution)")
    traces.add_argument("--n", type=int, default=2000, help="number of traces")
    traces.add_argument("--seed", type=int, default=0,
                        help="seed of problems, strategies and slips")
    traces.add_argument("--out", required=True, help="output JSONL file")
    drill = add_command("drill",
                        "write N two-digit addition problems as JSONL (problem, answer, solution)")
    drill.add_argument("--split", default="test", choices=SPLITS,
                       help="operand split (train and test never overlap)")
    drill.add_argument("--n", type=int, default=500, help="number of problems")
    drill.add_argument("--seed", type=int, default=0, help="seed of the problems")
    drill.add_argument("--out", required=True, help="output JSONL file")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be >= 1")
    try:
        check_output_file(args.out, "--out")
    except InputError as error:
        parser.error(str(error))
    if args.command == "drill":
        try:
            write_drill(args.out, args.split, args.n, args.seed)
        except ValueError as error:
            parser.error(f"--n: {error}")
        print(f"wrote {args.n} {args.split} drill problems to {args.out}")
        return
    write_traces(args.out, args.n, args.seed)
    print(f"wrote {args.n} traces to {args.out}")


if __name__ == "__main__":
    main()
