"""sweep.py: aggregation over hand-made runs (means, t intervals, pairing by seed, unfinished runs),
the phase summary on synthetic curves, the strategy metrics, and a 2-run, 3-step sweep end to
end."""

import json
import math

import pytest
from scipy.stats import t as student_t

from analysis import sweep
from conftest import build_model, build_tokenizer
from analysis.stats import mean_confidence_interval, phase_summary, step_of_fraction
from metrics import is_eval_record
from world.source import strategy_metrics

STEPS = 4  # training steps of the hand-made runs; evaluations after 0, 2 and 4 steps


def write_run(out, algo, seed, curve, finished=True, settings=()):
    """A hand-made run directory: config.json and metrics.jsonl with a held-out curve
    {step: pass@1}."""
    run_dir = sweep.Job(algo, seed, settings).run_dir(out)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"algo": algo, "seed": seed, "steps": STEPS,
                                                     "eval_every": 2}))
    records = []
    for step in range(STEPS if finished else STEPS - 1):
        if step in curve:
            records.append({"step": step, "eval/pass@1": curve[step]})
        records.append({"step": step, "reward": 0.5, "step_seconds": 1.0})
    if finished:
        records.append({"step": STEPS, "eval/pass@1": curve[STEPS]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_mean_confidence_interval_is_the_student_t_interval():
    mean, low, high = mean_confidence_interval([1.0, 2.0, 3.0, 6.0])
    # sample sd of (1, 2, 3, 6) is sqrt(14/3)
    half = student_t.ppf(0.975, 3) * math.sqrt(14 / 3) / 2
    assert mean == 3.0 and low == pytest.approx(3.0 - half) and high == pytest.approx(3.0 + half)
    assert (mean_confidence_interval([0.4])[0] == 0.4
            and math.isnan(mean_confidence_interval([0.4])[1]))


def test_outcomes_of_one_run_final_area_and_steps_to_target():
    records = [{"step": 0, "eval/pass@1": 0.2}, {"step": 2, "eval/pass@1": 0.6},
               {"step": 4, "eval/pass@1": 0.8}]
    values = sweep.run_outcome(sweep.Job("hicra", 0), records, target=0.7).values
    assert values["final"] == 0.8
    assert values["auc"] == pytest.approx((2 * 0.4 + 2 * 0.7) / 4)  # trapezoids over 4 steps
    # halfway from 0.6 (step 2) to 0.8 (step 4)
    assert values["steps_to_target"] == pytest.approx(3.0)
    assert sweep.run_outcome(sweep.Job("hicra", 0), records,
                             target=0.9).values["steps_to_target"] is None


def test_aggregation_pairs_by_seed_and_skips_unfinished_runs(tmp_path, capsys):
    finals = {("grpo", 0): 0.50, ("grpo", 1): 0.60, ("grpo", 2): 0.70, ("hicra", 0): 0.55,
              ("hicra", 1): 0.70}
    for (algo, seed), final in finals.items():
        write_run(tmp_path, algo, seed, {0: 0.3, 2: 0.4, 4: final})
    # stopped before its last step
    write_run(tmp_path, "hicra", 2, {0: 0.3, 2: 0.9}, finished=False)
    jobs = [sweep.Job(algo, seed) for algo in ("grpo", "hicra") for seed in (0, 1, 2)]
    outcomes = sweep.collect(jobs, tmp_path, target=0.5)
    assert "skipped (not finished)" in capsys.readouterr().out
    arms = sweep.arm_table(outcomes)
    assert sorted(arms["hicra"]["seeds"]) == [0, 1]
    assert arms["grpo"]["final"]["mean"] == pytest.approx(0.6)
    assert (arms["grpo"]["final"]["low"], arms["grpo"]["final"]["high"]) == pytest.approx(
        mean_confidence_interval([0.5, 0.6, 0.7])[1:])
    (paired,) = sweep.paired_comparisons(outcomes, "grpo")
    assert paired["final"]["seeds"] == [0, 1]  # seed 2 has no finished hicra run
    assert paired["final"]["mean"] == pytest.approx(0.075)  # mean of 0.05 and 0.10
    assert paired["final"]["low"] == pytest.approx(mean_confidence_interval([0.05, 0.10])[1])
    text = sweep.markdown_report(arms, [paired], [], 0.5, "# test")
    assert "| hicra - grpo |" in text and "0.600 [" in text


def test_best_setting_is_chosen_by_mean_final_accuracy(tmp_path):
    for algo, lr, finals in [("grpo", "1", (0.5, 0.6)), ("grpo", "2", (0.7, 0.8)),
                             ("hicra", "1", (0.9, 0.8)), ("hicra", "2", (0.6, 0.6))]:
        for seed, final in enumerate(finals):
            write_run(tmp_path, algo, seed, {0: 0.3, 2: 0.4, 4: final}, settings=(("lr", lr),))
    jobs = [sweep.Job(a, s, (("lr", lr),))
            for a in ("grpo", "hicra") for lr in ("1", "2") for s in (0, 1)]
    outcomes = sweep.collect(jobs, tmp_path, target=0.5)
    (best,) = sweep.best_settings(outcomes, sweep.arm_table(outcomes), "grpo")
    assert (best["arm"], best["baseline"]) == ("hicra-lr1", "grpo-lr2")
    assert best["final"]["mean"] == pytest.approx(0.1)  # (0.9 - 0.7 + 0.8 - 0.8) / 2


def test_run_is_finished_only_with_its_last_step_and_last_evaluation(tmp_path):
    write_run(tmp_path, "grpo", 0, {0: 0.1, 2: 0.2, 4: 0.3})
    write_run(tmp_path, "grpo", 1, {0: 0.1, 2: 0.2}, finished=False)
    assert sweep.run_finished(sweep.Job("grpo", 0).run_dir(tmp_path))
    assert not sweep.run_finished(sweep.Job("grpo", 1).run_dir(tmp_path))
    assert not sweep.run_finished(tmp_path / "never-started")


def test_phase_summary_finds_the_80_percent_step_of_each_group():
    # execution accuracy ramps 0 -> 1 over steps 0..50, sound share ramps 0 -> 1 over steps 0..150,
    # of 200
    rows = [{"step": s, "exec_acc_sound": min(s / 50, 1.0), "share_sound": min(s / 150, 1.0)}
            for s in range(200)]
    summary = phase_summary(rows, window=1)
    assert summary["t80/exec_acc_sound"] == 40 and summary["t80/execution"] == 40
    assert summary["t80/share_sound"] == 120 and summary["t80/planning"] == 120
    assert "t80/semantic_entropy" not in summary  # not logged


def test_step_of_fraction_follows_a_falling_curve_and_smooths_noise():
    steps = list(range(101))
    falling = [1.0 - 0.5 * min(s / 50, 1.0) for s in steps]  # 1.0 -> 0.5 by step 50
    assert step_of_fraction(steps, falling, window=1) == 40
    noisy = [v + (0.05 if s % 2 else -0.05) for s, v in zip(steps, falling)]
    assert abs(step_of_fraction(steps, noisy, window=11) - 40) <= 3
    assert step_of_fraction(steps, [0.3] * 101) is None


def test_strategy_metrics_shares_and_execution_accuracy():
    strategies = ["direct", "steps", "steps", "check", None]
    sound = [False, True, True, True, False]
    correct = [True, True, False, True, False]
    out = strategy_metrics(strategies, sound, correct, ("direct", "steps", "check"))
    assert out["share_steps"] == 0.4 and out["share_none"] == 0.2 and out["share_sound"] == 0.6
    assert out["exec_acc_steps"] == 0.5 and out["exec_acc_direct"] == 1.0
    assert out["exec_acc_sound"] == pytest.approx(2 / 3)
    assert "exec_acc_none" not in out


def test_two_run_three_step_sweep_end_to_end_and_resumable(tmp_path):
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "sweep"
    argv = ["--algos", "grpo", "hicra", "--seeds", "0", "--out", str(out), "--workers", "2",
            "--report", str(tmp_path / "report"), "--",
            "--model", str(tmp_path / "model"), "--steps", "3", "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "6", "--eval-every", "2", "--eval-limit", "3",
            "--eval-samples", "2"]
    text = sweep.main(argv)
    for algo in ("grpo", "hicra"):
        run_dir = out / f"{algo}-seed0"
        assert sweep.run_finished(run_dir)
        evals = [r["step"] for r in sweep.read_records(run_dir) if is_eval_record(r)]
        assert evals == [0, 2, 3]
        # strategy metrics on the world
        assert any("share_sound" in r for r in sweep.read_records(run_dir))
    assert "| hicra - grpo |" in text
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {
        "results.md", "results.json", "fig6_sweep.png", "phases_grpo.png", "phases_hicra.png"}
    log_before = (out / "hicra-seed0.log").read_text()
    sweep.main(argv)  # everything finished: nothing runs again
    assert (out / "hicra-seed0.log").read_text() == log_before


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "-1"], "--seed: must be in [0, "),
    (["--set", "lr"], "--set 'lr': expected FLAG=V1,V2"),
    (["--set", "lr=abc"], "argument --lr: invalid float value: 'abc'"),
    (["--seeds", "0", "0", "--report-only"], "--seeds: 0 is given twice"),
    (["--algos", "grpo", "hicra", "grpo"], "--algos: grpo is given twice"),
])
def test_a_bad_grid_is_one_line_and_exit_2_before_any_run_starts(tmp_path, capsys, argv, message):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as stop:
        sweep.main([*argv, "--out", str(out)])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not out.exists()


def test_a_finished_run_made_with_other_flags_is_not_reused(tmp_path, capsys):
    out = tmp_path / "sweep"
    run = out / "hicra-seed0"
    run.mkdir(parents=True)
    import train
    from config import saved_settings

    made = saved_settings(train.parse_args(["--algo", "hicra", "--seed", "0", "--lr", "1e-4",
                                            "--out", str(run)]))
    (run / "config.json").write_text(json.dumps(made))
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--algos", "hicra", "--seeds", "0", "--out", str(out), "--report-only", "--",
                    "--lr", "2e-4"])
    assert stop.value.code == 2
    assert f"{run} was made with --lr 0.0001, this sweep asks for 0.0002" in capsys.readouterr().err


def test_dose_response_finds_a_per_seed_slope_and_the_paired_control_difference(tmp_path):
    from analysis import dose_response

    out = tmp_path / "sweep"
    for seed, noise in enumerate([0.0, 0.01, -0.01]):
        for algo, alpha, final in [("grpo", None, 0.50), ("hicra", 0.2, 0.52), ("hicra", 1.0, 0.60),
                                   ("random_spans", 0.2, 0.49)]:
            settings = ((("alpha", str(alpha)),)
                        if alpha is not None and algo == "hicra" and alpha != 0.2 else ())
            write_run(out, algo, seed, {0: 0.3, 2: 0.4, STEPS: final + noise}, settings=settings)
            config = json.loads(
                (sweep.Job(algo, seed, settings).run_dir(out) / "config.json").read_text())
            config["alpha"] = alpha if alpha is not None else 0.2
            (sweep.Job(algo, seed, settings).run_dir(out) / "config.json").write_text(
                json.dumps(config))
    result = dose_response.analyse(dose_response.read_runs([out], target=0.55))
    assert sorted(result["per_alpha"]) == [0.0, 0.2, 1.0]
    assert result["per_alpha"][1.0]["final"]["mean"] == pytest.approx(0.60)
    assert result["slopes"]["final"]["mean"] == pytest.approx(
        slope_of([(0, 0.5), (0.2, 0.52), (1.0, 0.6)]))
    # the same slope in every seed
    assert result["slopes"]["final"]["n"] == 3 and result["slopes"]["final"]["low"] > 0
    assert result["hicra_minus_random_spans"]["final"]["mean"] == pytest.approx(0.03)
    below = dose_response.analyse(dose_response.read_runs([out], target=0.55),
                                  slope_up_to=0.5)["slopes"]
    # alpha 1 left out
    assert below["final_up_to"]["mean"] == pytest.approx(slope_of([(0, 0.5), (0.2, 0.52)]))
    assert below["final"] == result["slopes"]["final"]


def slope_of(points):
    xs, ys = zip(*points)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


def test_a_model_folder_copied_elsewhere_is_the_same_model(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")
    assert sweep.same_folder_contents(str(first), str(second))
    (second / "model.safetensors").write_bytes(b"weightz")
    assert not sweep.same_folder_contents(str(first), str(second))
    (second / "model.safetensors").write_bytes(b"weights")
    (second / "extra.txt").write_text("x")
    assert not sweep.same_folder_contents(str(first), str(second))
    assert not sweep.same_folder_contents(str(first), str(tmp_path / "missing"))


def test_dose_response_names_a_missing_runs_folder_in_one_line(tmp_path, capsys):
    from analysis import dose_response

    with pytest.raises(SystemExit) as stop:
        dose_response.main(["--runs", str(tmp_path / "missing"),
                            "--report", str(tmp_path / "report")])
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in error
    assert error.startswith(f"error: --runs: {tmp_path / 'missing'} is not a folder")
    assert not (tmp_path / "report").exists()


def test_a_damaged_run_in_a_sweep_is_named_in_one_line(tmp_path):
    write_run(tmp_path, "grpo", 0, {0: 0.3, 2: 0.4, 4: 0.5})
    write_run(tmp_path, "grpo", 1, {0: 0.3, 2: 0.4, 4: 0.5})
    write_run(tmp_path, "grpo", 2, {0: 0.3, 2: 0.4, 4: 0.5})
    metrics = sweep.Job("grpo", 0).run_dir(tmp_path) / "metrics.jsonl"
    metrics.write_text('{"step": 0, "reward": 0.5}\n{"step": 1, "rew\n')
    config = sweep.Job("grpo", 1).run_dir(tmp_path) / "config.json"
    config.write_text('{"algo": ')
    with pytest.raises(sweep.InputError, match=r"grpo-seed0/metrics.jsonl:2: malformed JSON"):
        sweep.collect([sweep.Job("grpo", 0)], tmp_path, target=0.5)
    with pytest.raises(sweep.InputError, match=r"grpo-seed1/config.json: malformed JSON"):
        sweep.collect([sweep.Job("grpo", 1)], tmp_path, target=0.5)
    config.write_text('["not", "settings"]')
    with pytest.raises(sweep.InputError,
                       match=r"grpo-seed1/config.json: not a train.py run config"):
        sweep.collect([sweep.Job("grpo", 1)], tmp_path, target=0.5)


def test_a_report_folder_that_is_a_file_is_refused_before_any_run(tmp_path, capsys):
    report = tmp_path / "results.md"
    report.write_text("mine\n")
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--seeds", "0", "--out", str(tmp_path / "sweep"), "--report", str(report)])
    error = capsys.readouterr().err.strip()
    assert (stop.value.code == 2 and error.startswith("error: --report:") and "is a file" in error
            and "\n" not in error)
    assert report.read_text() == "mine\n" and not (tmp_path / "sweep").exists()


def test_a_link_planted_as_a_run_log_is_not_written_through(tmp_path, capsys):
    out, victim = tmp_path / "sweep", tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out.mkdir()
    (out / "grpo-seed0.log").symlink_to(victim)
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--algos", "grpo", "--seeds", "0", "--out", str(out), "--", "--steps", "1",
                    "--eval-every", "0"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and error.startswith("error: ") and "symbolic link" in error
    assert victim.read_text() == "keep me\n"


def test_compare_pairs_arms_of_different_sweeps_by_seed_with_one_bonferroni_rule(tmp_path, capsys):
    from analysis import compare  # noqa: PLC0415

    for seed, (a, b) in enumerate([(0.50, 0.55), (0.60, 0.62), (0.70, 0.69)]):
        write_run(tmp_path / "one", "grpo", seed, {0: 0.3, 2: 0.4, 4: a})
        write_run(tmp_path / "two", "hicra", seed, {0: 0.3, 2: 0.4, 4: b})
    text = compare.main(["--arm", f"g={tmp_path / 'one' / 'grpo'}",
                         "--arm", f"h={tmp_path / 'two' / 'hicra'}",
                         "--seeds", "0", "1", "2", "--pairs", "h-g", "--target", "0.5"])
    mean, low, high = mean_confidence_interval([0.05, 0.02, -0.01])
    assert f"| h - g | final | 3 | {mean:+.3f} [{low:+.3f}, {high:+.3f}] |" in text
    assert "Bonferroni over 2" in text and "| g | 3 | 0.600 [" in text
    with pytest.raises(SystemExit) as stop:
        compare.main(["--arm", f"g={tmp_path / 'one' / 'grpo'}", "--seeds", "0", "1",
                      "--pairs", "g-x"])
    assert stop.value.code == 2 and "--pairs 'g-x'" in capsys.readouterr().err
