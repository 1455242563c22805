"""The built-in world as a problem source (data.ProblemSource): what train.py, eval.py and the
metrics may ask of it, in one place. The core reaches the world only through `SOURCE` (data.PLUGINS
lists this package).

- data names `world`, `world_train`, `world_v1`, `world_v1_train` (tasks.WORLD_SPLITS), each
  training set's held-out set, the world's strategic grams (preset `world`) and its tiny model;
- per-step figures only a world can give: error types (Sec. 4, Fig. 5: strategy vs execution
  failures) and each strategy's share and execution accuracy (strategy_metrics);
- reference traces, the corpus placebo n-grams are drawn from.
"""

import dataclasses
from collections.abc import Sequence
from functools import partial

from data import Problem, ProblemSource
from metrics import error_type_metrics
from world import tasks

PLACEBO_CORPUS_SIZE = 2000  # reference traces the placebo n-grams are drawn from (seed 0)
# a boxed integer never equals it, so classify_error always sees a failure
NEVER_AN_ANSWER = "not a number"


def world_split(name: str, limit: int | None, seed: int) -> list[Problem]:
    """The problems of the data name `name`: `limit` of them, or the split's default count."""
    split, default_n, world = tasks.WORLD_SPLITS[name]
    return tasks.world_problems(split, limit or default_n, seed, world)


def strategy_metrics(strategies: Sequence[str | None], sound: Sequence[bool],
                     correct: Sequence[bool], known: Sequence[str]) -> dict[str, float]:
    """Share and execution accuracy of each strategy in one batch (built-in world;
    tasks.detect_strategy).

    strategies: the strategy of each completion (None: missing or foreign plan); sound: whether that
    strategy is a sound one (its failures are execution errors, tasks.classify_error); correct:
    reward 1. Keys: `share_<s>` for every s in `known` and `share_none`; `exec_acc_<s>` = correct /
    count among the completions following s (omitted when none does); `share_sound` and
    `exec_acc_sound` over all sound completions: the planning side (how often a sound plan is
    chosen) and the execution side (how often a sound plan is carried out without an arithmetic
    slip) of the same batch.
    """
    n = len(strategies)
    out: dict[str, float] = {}
    for name, chosen in [*((s, [x == s for x in strategies]) for s in known),
                         ("none", [x is None for x in strategies]), ("sound", list(sound))]:
        count = sum(chosen)
        out[f"share_{name}"] = count / n
        if count and name != "none":
            out[f"exec_acc_{name}"] = sum(c for c, k in zip(correct, chosen) if k) / count
    return out


def batch_figures(problems: list[Problem], texts: list[str],
                  correct: list[bool]) -> dict[str, float]:
    """Error types and strategy metrics of one batch (one problem per completion).

    A completion's plan is sound iff the world's classifier would call its failure an execution
    error (tasks.classify_error asked with an answer no completion gives), so the set of sound
    strategies stays the world's own.
    """
    figures = error_type_metrics([tasks.classify_error(p, text)
                                  for p, text in zip(problems, texts)])
    strategies = [tasks.detect_strategy(problem, text) for problem, text in zip(problems, texts)]
    sound = [tasks.classify_error(dataclasses.replace(problem, answer=NEVER_AN_ANSWER), text)
             == "execution" for problem, text in zip(problems, texts)]
    return figures | strategy_metrics(strategies, sound, correct, tasks.STRATEGIES)


def reference_texts(n: int, seed: int) -> list[str]:
    """`n` correct reference traces (tasks.reference_traces)."""
    return [problem.meta["solution"] for problem in tasks.reference_traces(n, seed)]


SOURCE = ProblemSource(
    problems={name: partial(world_split, name) for name in tasks.WORLD_SPLITS},
    held_out={"world_train": "world", "world_v1_train": "world_v1"},
    grams_preset="world",
    grams=tuple(tasks.WORLD_GRAMS),
    model=tasks.DEFAULT_MODEL_DIR,
    check_model=lambda flag, name, model: tasks.check_world_model(model, {flag: name}),
    batch_figures=batch_figures,
    reference_texts=reference_texts,
)
