"""Generated problem sets reach the core only as a data.ProblemSource from a plug-in package
(data.PLUGINS): the built-in world is one, and a second one plugs in the same way without touching
the core."""

import sys

import pytest

import config
import data
from cli import InputError

PLUGIN = '''
from data import Problem, ProblemSource


def drill(limit, seed):
    return [Problem(f"What is {i} + {seed}?", str(i + seed)) for i in range(limit or 3)]


def refuse_other_models(flag, name, model):
    if model != "drill-model":
        from cli import InputError
        raise InputError(f"{flag} {name}: needs --model drill-model")


SOURCE = ProblemSource(
    problems={"drill_train": drill, "drill_test": drill},
    held_out={"drill_train": "drill_test"},
    grams_preset="drill",
    grams=("let me add",),
    model="drill-model",
    check_model=refuse_other_models,
    batch_figures=lambda problems, texts, correct: {"drill/solved": sum(correct) / len(correct)},
    reference_texts=lambda n, seed: ["let me add 1 and 2. it is 3."] * n,
)
'''


@pytest.fixture
def drill_plugin(tmp_path, monkeypatch):
    package = tmp_path / "drill"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "source.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(data, "PLUGINS", (*data.PLUGINS, "drill"))
    data.problem_sources.cache_clear()
    yield
    data.problem_sources.cache_clear()
    sys.modules.pop("drill.source", None)
    sys.modules.pop("drill", None)


def test_the_world_is_a_problem_source():
    sources = data.problem_sources()
    assert {"world", "world_train", "world_v1", "world_v1_train"} <= set(sources)
    assert data.source_of("gsm8k") is None and data.source_of("some/file.jsonl") is None
    world = sources["world_train"]
    assert config.held_out("world_train") == "world" and config.held_out("gsm8k_train") == "gsm8k"
    assert config.default_grams("world_v1_train") == world.grams_preset == "world"
    assert config.default_grams("gsm8k_train") == "paper"
    assert config.default_model("gsm8k_train") == config.default_model("world_train")
    assert config.default_model("world_train") == world.model
    wanted = "world v2's model; use --model world/models/tiny-world-v1"
    with pytest.raises(InputError, match=wanted):
        data.check_data_model(config.default_model("world_v1_train"), {"--data": "world_v1_train"})


def test_a_second_plugin_adds_data_names_grams_and_figures_without_touching_the_core(drill_plugin):
    import grams

    assert [p.answer for p in data.load_problems("drill_train", limit=2, seed=5)] == ["5", "6"]
    settings = config.TrainConfig(data="drill_train")
    assert (settings.eval_data, settings.grams) == ("drill_test", "drill")
    assert settings.model == "drill-model"
    assert grams.load_grams("drill") == ["let me add"]
    data.check_data_model("drill-model", {"--data": "drill_train"})
    with pytest.raises(InputError, match="--data drill_train: needs --model drill-model"):
        data.check_data_model("world/models/tiny-world", {"--data": "drill_train"})
    figures = data.source_of("drill_train").batch_figures([], [], [True, False])
    assert figures == {"drill/solved": 0.5}
    assert "drill_test" in str(pytest.raises(InputError, data.load_problems, "no_such_set").value)
