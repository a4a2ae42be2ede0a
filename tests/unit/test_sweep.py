"""``t2v sweep``'s plan: which ``--set`` values are sweep axes, the variants they make and their names, checked
before anything trains; and ``t2v bench learn``'s reading of when a curve reached its target."""

from __future__ import annotations

import pytest

from flows import sweep
from flows.benchmarks import learn
from pipelines.settings import ConfigError


def test_list_values_are_axes_unless_the_setting_takes_a_list():
    fixed, axes = sweep.split_sets(
        ["lr=[1e-3,3e-3]", "steps=20", "data=[a,b]", "sample_prompts=[[x],[y,z]]", "model_overrides.height=[16,32]"]
    )
    assert fixed == ["steps=20", "data=[a,b]"]  # data takes a list: one value, not an axis
    assert axes == {"lr": [0.001, 0.003], "sample_prompts": [["x"], ["y", "z"]], "model_overrides.height": [16, 32]}
    plan = sweep.variants({"lr": [0.001, 0.003], "model_overrides.height": [16, 32]})
    assert len(plan) == 4 and plan[1] == {"lr": 0.001, "model_overrides.height": 32}
    assert sweep.variant_name(plan[1]) == "lr=0.001,height=32"
    assert sweep.variants({}) == [{}]


@pytest.mark.parametrize(
    "item, words", [("nosuch=[1,2]", "'nosuch' is not a training setting"), ("lr=[]", "at least one value")]
)
def test_bad_axes_are_refused(item, words):
    with pytest.raises(ConfigError, match=words):
        sweep.split_sets([item])


def test_a_bad_variant_stops_the_sweep_before_training(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--set", "lr=[1.0e-3,-1]", "--dry-run"])
    assert "lr=-1" in capsys.readouterr().err


def test_dry_run_lists_the_variants(capsys):
    assert sweep.main(["--set", "lr=[1.0e-3,2.0e-3]", "--set", "zero_stage=[0,2]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "- lr=0.001,zero_stage=0" in out and "- lr=0.002,zero_stage=2" in out


def test_time_and_step_to_a_target():
    curve = {"minutes": [1.0, 2.0, 3.0], "step": [10, 20, 30], "value": [0.5, 0.9, 0.8]}
    assert learn.reached(curve, 0.9) == (2.0, 20)
    assert learn.reached(curve, 0.95) is None
    assert learn.LearnBenchConfig().train.model == "tiny"  # the demo's recipe
    with pytest.raises(ConfigError, match="not one of"):
        learn.LearnBenchConfig(ablations=["nope"])
