"""The declarative configuration (config.py): one declaration per flag, from which the parser, the
bounds, config.json, --config files and the resume merge are derived."""

import dataclasses
import json

import pytest

import config
import run_folder
import train
from cli import InputError, flag_name
from conftest import one_line_input_error


def parser_flags(parser) -> dict[str, object]:
    """Each long flag of a parser and its default."""
    return {option: action.default for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def read_config(path: str) -> config.TrainConfig:
    """train.py's settings from `--config path`."""
    return train.parse_args(["--config", path])


def test_every_setting_is_one_flag_with_its_declared_default_and_help():
    flags = parser_flags(config.build_parser())
    specs = dataclasses.fields(config.TrainConfig)
    aliases = [alias for spec in specs for alias in spec.metadata["aliases"]]
    declared = [flag_name(spec.name) for spec in specs] + aliases
    assert sorted(flags) == sorted(declared)  # each setting once, plus its declared other spellings
    assert flags["--mixed-precision"] == flags["--dtype"]
    defaults = {spec.name: spec.default_factory() if spec.default_factory is not dataclasses.MISSING
                else spec.default for spec in specs}
    assert all(flags[flag_name(name)] == value for name, value in defaults.items())
    assert all(spec.metadata["help"] for spec in specs)


def test_the_bounds_come_from_the_declarations():
    alpha = next(spec for spec in dataclasses.fields(config.TrainConfig) if spec.name == "alpha")
    assert config.BOUNDS["alpha"] is alpha.metadata["bound"]
    with pytest.raises(InputError, match=r"^--alpha: must be in \[0, 1\], got 1.5"):
        train.parse_args(["--alpha", "1.5"])


def test_a_config_file_sets_what_the_command_line_does_not(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("lr: 1e-4\nalgo: grpo\ngroup-size: 4\nreport_to: []\n")
    parsed = train.parse_args(["--config", str(settings), "--group-size", "6"])
    # the flag given overrides the file
    assert (parsed.lr, parsed.algo, parsed.group_size) == (1e-4, "grpo", 6)
    assert parsed.seed == 0  # neither: the default


def test_a_runs_own_config_json_loads_as_a_config_file(tmp_path):
    parsed = train.parse_args(["--lr", "3e-05", "--algo", "placebo", "--out", "x"])
    saved = config.saved_settings(parsed)
    (tmp_path / "config.json").write_text(json.dumps(saved, indent=2))
    parsed = train.parse_args(["--config", str(tmp_path / "config.json"), "--out", "y"])
    assert config.saved_settings(parsed) == {**saved, "out": "y"}


@pytest.mark.parametrize("content, message", [
    ('{"lr": "fast"}', "--lr: expected float, got 'fast'"),
    ('{"steps": 2.5}', "--steps: expected int, got 2.5"),
    ('{"steps": true}', "--steps: expected int, got True"),
    ('{"algo": "ppo"}', "--algo: 'ppo' is not one of grpo, hicra"),
    ('{"algo": null}', "--algo: expected str, got None"),
    ('{"report_to": "tensorboard"}', "--report-to: expected a list of names, got 'tensorboard'"),
    ('{"report_to": ["tensorbored"]}',
     "--report-to: 'tensorbored' is not one of tensorboard, wandb"),
    ('{"bogus": 1}', "unknown setting 'bogus'"),
    ('{"resume": "elsewhere"}', "unknown setting 'resume'"),
    ('[1, 2]', "not a readable run config (not a mapping of settings)"),
    ('{"lr": ', "not a readable run config"),
])
def test_a_bad_config_file_is_a_one_line_error_naming_the_setting(tmp_path, content, message):
    error = one_line_input_error(tmp_path / "bad.json", content, read_config)
    assert error.startswith("--config") and message in error  # the flag, the file and the setting


def a_run_folder(tmp_path):
    """An empty run folder with the marker train.py writes."""
    run = tmp_path / "run"
    run.mkdir()
    (run / run_folder.MARKER).write_text("{}")
    return run


def test_a_hand_edited_run_config_is_checked_on_resume(tmp_path):
    run = a_run_folder(tmp_path)
    saved = config.saved_settings(train.parse_args(["--out", str(run)]))
    (run / "config.json").write_text(json.dumps({**saved, "algo": "ppo"}))
    with pytest.raises(InputError, match=r"--resume .*config.json: --algo: 'ppo' is not one of"):
        train.parse_args(["--resume", str(run)])
    (run / "config.json").write_text(json.dumps({**saved, "lr": -1.0}))
    with pytest.raises(InputError, match=r"^--lr: must be > 0, got -1.0"):
        train.parse_args(["--resume", str(run)])


def test_resume_takes_the_saved_settings_then_the_flags_given(tmp_path):
    run = a_run_folder(tmp_path)
    parsed = train.parse_args(["--out", str(run), "--seed", "7", "--steps", "3"])
    saved = config.saved_settings(parsed)
    (run / "config.json").write_text(json.dumps(saved))
    resumed = train.parse_args(["--resume", str(run), "--steps", "5"])
    assert (resumed.seed, resumed.steps, resumed.out) == (7, 5, str(run))
    with pytest.raises(InputError, match="^--lora-rank: this run was trained with --lora-rank 0"):
        train.parse_args(["--resume", str(run), "--lora-rank", "4"])


@pytest.mark.parametrize("line, message", [
    ("out: elsewhere",
     "^--out: a resumed run stays in its folder, but --config .* sets out: elsewhere"),
    ("model: another/model",
     "^--model: this run was trained with --model .*, --config .* asks for another/model"),
    ("lora_rank: 4",
     "^--lora-rank: this run was trained with --lora-rank 0, --config .* asks for 4"),
])
def test_a_config_file_cannot_move_a_resumed_run_or_change_its_model(tmp_path, line, message):
    run = a_run_folder(tmp_path)
    saved = config.saved_settings(train.parse_args(["--out", str(run), "--steps", "3"]))
    (run / "config.json").write_text(json.dumps(saved))
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"group_size: 4\n{line}\n")
    with pytest.raises(InputError, match=message):
        train.parse_args(["--resume", str(run), "--config", str(settings)])
    settings.write_text("group_size: 4\n")  # settings that may change on resume still do
    assert train.parse_args(["--resume", str(run), "--config", str(settings)]).group_size == 4


def test_the_trl_launcher_declares_no_flag_of_train_py_again():
    pytest.importorskip("trl")
    from scale_out import train_trl

    specs = {spec.name: spec for spec in dataclasses.fields(config.TrainConfig)}
    shared = {flag_name(name) for name in train_trl.SHARED_FLAGS}
    shared |= {alias for name in train_trl.SHARED_FLAGS
               for alias in specs[name].metadata["aliases"]}
    own = {flag_name(spec.name) for spec in dataclasses.fields(train_trl.TrlFlags)}
    trl_flags = parser_flags(train_trl.build_parser())
    assert set(trl_flags) == shared | own
    train_flags = parser_flags(config.build_parser())
    # same defaults: declared once
    assert all(trl_flags[flag] == train_flags[flag] for flag in shared)


def test_train_help_shows_every_flags_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--lr LR AdamW learning rate (default: 0.0002)" in text
    assert "training steps (rollout + update) (default: 200)" in text
    # every flag, --help aside
    assert text.count("(default:") == len(dataclasses.fields(config.TrainConfig))


@pytest.mark.parametrize("flags, eval_data, grams", [
    ([], "world", "world"),
    (["--data", "gsm8k_train"], "gsm8k", "paper"),
    (["--data", "world_v1_train", "--model", "world/models/tiny-world-v1"], "world_v1", "world"),
    (["--data", "gsm8k_train", "--eval-data", "math500", "--grams", "world"], "math500", "world"),
])
def test_held_out_problems_and_grams_follow_the_training_data(flags, eval_data, grams):
    parsed = train.parse_args(flags)
    assert (parsed.eval_data, parsed.grams, parsed.eval_every) == (eval_data, grams, 50)


def test_training_on_a_file_evaluates_nothing_unless_told_and_says_so(tmp_path, capsys):
    problems = tmp_path / "mine.jsonl"
    problems.write_text('{"problem": "1+1", "answer": "2"}\n')
    parsed = train.parse_args(["--data", str(problems)])
    assert (parsed.eval_data, parsed.grams, parsed.eval_every) == (None, "paper", 0)
    assert capsys.readouterr().out.count("no held-out evaluation") == 1
    assert train.parse_args(["--data", str(problems), "--eval-data", "gsm8k"]).eval_every == 50


def test_the_lesson_recipe_loads_as_a_config_file():
    parsed = train.parse_args(["--config", "lesson/grpo_vs_hicra.yaml", "--algo", "grpo"])
    schedule = (parsed.steps, parsed.eval_every, parsed.eval_limit, parsed.save_every)
    assert schedule == (120, 40, 200, 0)
    assert (parsed.data, parsed.eval_data, parsed.algo) == ("world_train", "world", "grpo")


def test_every_scripts_help_shows_the_defaults():
    """Every parser (and sub-command parser) of the project formats its help with
    ArgumentDefaultsHelpFormatter, except helper parsers without a --help of their own
    (add_help=False: their flags show in train.py's help)."""
    import ast  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = Path(__file__).parent.parent
    missing = []
    for path in sorted(root.glob("**/*.py")):
        if "tests" in path.parts or path.name.startswith("test_") or ".whl" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            called = getattr(node.func, "attr", getattr(node.func, "id", None))
            if called in ("ArgumentParser", "OneLineParser", "add_parser"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if "ArgumentDefaultsHelpFormatter" not in keywords.get("formatter_class", "") \
                        and keywords.get("add_help") != "False":
                    missing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not missing, missing


@pytest.mark.parametrize("text, message", [
    ("a: &bomb [1, 2]\nb: [*bomb, *bomb]\nmodel: x\n", "YAML anchors and aliases"),
    ("model: " + "x" * 5000 + "\nalgo: " + "y" * 5000 + "\n",
     "... (5,002 characters) is not one of"),
    ("lr: [" * 5000 + "]" * 5000 + "\n", "not a readable run config"),
])
def test_a_hostile_config_file_is_one_short_line(tmp_path, text, message):
    error = one_line_input_error(tmp_path / "run.yaml", text, read_config)
    assert message in error and len(error) < 400


def test_a_config_file_over_the_size_limit_is_refused_unread(tmp_path):
    error = one_line_input_error(tmp_path / "run.yaml", "# " + "x" * config.MAX_CONFIG_BYTES + "\n",
                                 read_config)
    assert "over the 1,000,000 a run config may have" in error
