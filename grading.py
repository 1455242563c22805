"""Running a reward function over a batch: in parallel, under one deadline, its failures counted.

reward.py says what a reward is; this file says how a batch of gradings runs:
- `grade`: one call, never raising. A reward that raises (anything, KeyboardInterrupt and sys.exit
  included: from a worker thread neither is the user's Ctrl-C), or returns something that is not a
  number within +-REWARD_LIMIT (NaN, an infinity, 1e300, a string, an object whose __float__ fails)
  scores 0 and says why ("error", "exit", "invalid"; "timeout" for reward.GradingTimeout).
- `grade_batch`: GRADING_WORKERS gradings in flight at once, and one deadline for the whole batch,
  --reward-timeout seconds after it starts: every grading not finished then scores 0 as a "timeout".
  So a step's grading takes at most --reward-timeout, whatever the reward does (a reward that always
  hangs costs one timeout per step, not one per GRADING_WORKERS completions). The workers are daemon
  threads: one stuck in a reward is left behind and never holds up Ctrl-C or the end of the process
  (concurrent.futures' pool would join it at exit).
- `describe_failure`: what a reward did on one pair, for the error that stops a run whose every
  grading fails.
"""

import math
import threading
import time

from reward import GradingTimeout

# gradings of a batch in flight at once (each mostly waits on its child process)
GRADING_WORKERS = 8
# a batch's grading deadline (--reward-timeout); above reward.DEFAULT_TIMEOUT_S
REWARD_TIMEOUT_S = 10.0
# a reward beyond +-this is a bug, not a score: it would swamp every advantage of its group
REWARD_LIMIT = 1e6


def reward_value(value) -> tuple[float, str | None]:
    """(reward, failure) for what a reward returned: a real number within +-REWARD_LIMIT, else (0,
    "invalid")."""
    if isinstance(value, (str, bytes)) or value is None:
        return 0.0, "invalid"
    try:
        reward = float(value)
    # TypeError, ValueError, OverflowError (10**400), or whatever a __float__ raises
    except Exception:
        return 0.0, "invalid"
    return ((reward, None) if math.isfinite(reward) and abs(reward) <= REWARD_LIMIT
            else (0.0, "invalid"))


def short_repr(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters; a value whose repr fails (an int of 5,000 digits) by
    its type."""
    try:
        return repr(value)[:limit]
    # ValueError past Python's int-to-str digit limit, or the object's own __repr__ failing
    except Exception:
        return f"a {type(value).__name__} with no printable value"


def grade(fn, completion: str, answer: str) -> tuple[float, str | None]:
    """(reward, failure); a failed grading scores 0. failure is None, "timeout"
    (reward.GradingTimeout), "error" (`fn` raised), "exit" (`fn` raised SystemExit) or "invalid"
    (see reward_value)."""
    try:
        value = fn(completion, answer)
    except GradingTimeout:
        return 0.0, "timeout"
    except SystemExit:
        return 0.0, "exit"
    # a grader bug must not stop training (nor a KeyboardInterrupt it raises itself)
    except BaseException:
        return 0.0, "error"
    return reward_value(value)


def grade_batch(fn, completions: list[str], answers: list[str], workers: int = GRADING_WORKERS,
                timeout_s: float = REWARD_TIMEOUT_S) -> list[tuple[float, str | None]]:
    """`grade` of each (completion, answer) pair, in order, `workers` at a time; every grading
    unfinished `timeout_s` seconds after the batch started scores (0, "timeout")."""
    pairs = list(zip(completions, answers, strict=True))
    results: list[tuple[float, str | None]] = [(0.0, "timeout")] * len(pairs)
    lock, state = threading.Lock(), {"next": 0, "closed": False}

    def work() -> None:
        while True:
            with lock:
                if state["closed"] or state["next"] == len(pairs):
                    return
                index = state["next"]
                state["next"] += 1
            graded = grade(fn, *pairs[index])
            with lock:
                if state["closed"]:  # past the deadline: the batch's results are already returned
                    return
                results[index] = graded

    threads = [threading.Thread(target=work, daemon=True)
               for _ in range(min(max(workers, 1), len(pairs)))]
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    with lock:
        state["closed"] = True
        return list(results)


def describe_failure(fn, completion: str, answer: str, timeout_s: float = REWARD_TIMEOUT_S) -> str:
    """What `fn` does on one pair, in a few words, for an error message: "raised ValueError: ...",
    "called sys.exit(3)", "returned 1e+300 (not a number within +-1e+06)", "ran over
    --reward-timeout N s". Runs `fn` once more, in a daemon thread, under the same deadline."""
    outcome: list[str] = []

    def call() -> None:
        try:
            value = fn(completion, answer)
        except SystemExit as stop:
            outcome.append(f"called sys.exit({stop.code!r:.40})")
        except BaseException as error:  # the user's function may fail in any way
            message = f": {str(error).splitlines()[0]}" if str(error).strip() else ""
            outcome.append(f"raised {type(error).__name__}{message}"[:120])
        else:
            valid = reward_value(value)[1] is None
            outcome.append(f"returned {short_repr(value)}"
                           + ("" if valid else f" (not a number within +-{REWARD_LIMIT:g})"))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"ran over --reward-timeout {timeout_s:g} s"


def score_completions(fn, completions: list[str], answers: list[str],
                      timeout_s: float = REWARD_TIMEOUT_S) -> tuple[list[float], int]:
    """Rewards of `fn` for each (completion, answer) pair, and how many gradings failed
    (scored 0)."""
    graded = grade_batch(fn, completions, answers, timeout_s=timeout_s)
    return [reward for reward, _ in graded], sum(failure is not None for _, failure in graded)
