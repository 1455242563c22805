"""walkthrough.py runs as a plain script, and the values it prints are those of the project's
functions."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo import group_advantages

ROOT = Path(__file__).parent.parent


def run_walkthrough(**knobs) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           **{f"WALKTHROUGH_{k.upper()}": str(v) for k, v in knobs.items()}}
    done = subprocess.run([sys.executable, "walkthrough.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr  # a learner's run prints nothing to ignore
    return done.stdout


def numbers_after(label: str, output: str) -> list[float]:
    line = next(line for line in output.splitlines() if line.startswith(label))
    return [float(x) for x in re.findall(r"-?\d+\.\d+", line.removeprefix(label))]


@pytest.fixture(scope="module")
def output() -> str:
    return run_walkthrough()


def test_the_printed_advantages_are_the_group_advantages_of_the_printed_rewards(output):
    rewards = torch.tensor(numbers_after("rewards:", output))
    advantages = torch.tensor(numbers_after("advantages:", output))
    torch.testing.assert_close(advantages, group_advantages(rewards, 8, "center"), atol=1e-6,
                               rtol=0)


def test_the_token_table_shows_a_plus_alpha_abs_a_on_planning_tokens_only(output):
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "A^H (HICRA)" in line) + 1
    rows = [line.split() for line in lines[start:]
            if re.match(r"^  \S.*[+-]\d\.\d{3}\s+[+-]\d\.\d{3}$", line)]
    assert len(rows) >= 5
    for row in rows:
        planning, a, a_hicra = row[-3] == "yes", float(row[-2]), float(row[-1])
        assert a_hicra == pytest.approx(a + 0.2 * abs(a) if planning else a, abs=1e-3), row
    assert any(row[-3] == "yes" for row in rows) and any(row[-3] != "yes" for row in rows)


def test_the_clip_is_inert_on_the_first_pass_and_acts_on_the_second(output):
    largest = float(re.search(r"largest \|ratio - 1\| = (\S+)", output).group(1))
    assert largest < 1e-4
    assert numbers_after("first pass: clipped", output) == [0.0, 0.0]
    below, above = numbers_after("second pass:", output)[2:]
    assert below + above > 0


def test_the_gradient_on_planning_tokens_is_scaled_by_one_plus_and_one_minus_alpha(output):
    assert "planning tokens, A > 0" in output and "1.200 x GRPO's" in output
    assert "planning tokens, A < 0" in output and "0.800 x GRPO's" in output
    execution = [line for line in output.splitlines()
                 if line.strip().startswith("execution tokens")]
    assert execution and all(line.endswith("1.000 x GRPO's") for line in execution)


def test_exercise_two_and_three_zero_variance_groups_and_failed_planning_tokens_at_alpha_one():
    """One run for two exercises: 8 problems (a zero-variance group appears) at alpha = 1."""
    output = run_walkthrough(alpha=1, prompts=8)
    assert "(zero-variance group: nothing to learn)" in output
    zero_variance = [line for line in output.splitlines() if line.startswith("zero-variance group")]
    assert zero_variance and all(line.endswith("tokens: True") for line in zero_variance)
    failed = next(line for line in output.splitlines() if line.startswith("failed completion"))
    planning, execution = re.search(r"planning tokens \[(.*?)\], on its execution tokens "
                                    r"\[(.*?)\]", failed).groups()
    a = float(re.search(r"A = ([+-]\d\.\d+)", failed).group(1))
    assert [float(v) for v in planning.split(", ")] == [0.0]  # A + |A| = 0 for A < 0
    assert [float(v) for v in execution.split(", ")] == [pytest.approx(a, abs=1e-3)]


def test_exercise_four_a_confident_tokens_push_lies_between_one_and_sqrt_two_times_one_minus_p(
        output):
    line = next(line for line in output.splitlines()
                if line.startswith("most confident planning token"))
    one_minus_p, push, bound = (float(x) for x in re.findall(r"= (\d\.\d+e[+-]\d+)", line))
    assert 0 <= one_minus_p < 0.1 and one_minus_p * 0.999 <= push <= bound * 1.001
    for name in ("planning", "execution"):
        p, push = numbers_after(f"mean over {name} tokens: p(token)", output)
        assert 0 < p <= 1 and 0 <= push <= 2 ** 0.5


def test_exercise_five_the_written_out_hicra_advantage_equals_the_projects(output):
    assert "your A^H equals hicra.hicra_advantages on every completion token: True" in output


def test_exercise_one_alpha_zero_gives_grpo(output):
    assert "HICRA advantages equal GRPO's on every token: False" in output
    zero = run_walkthrough(alpha=0)
    assert "HICRA advantages equal GRPO's on every token: True" in zero
    assert all(line.endswith("1.000 x GRPO's") for line in zero.splitlines() if "x GRPO's" in line)
