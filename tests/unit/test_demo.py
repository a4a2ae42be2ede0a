"""The main job's settings: what `t2v demo --dry-run` shows and refuses."""

import pytest
import yaml

from flows import demo


def test_dry_run_prints_the_flow_as_the_cycle_runs_it(tmp_path, capsys):
    assert demo.main(["--state-dir", str(tmp_path / "d"), "--set", "flow.train.steps=5", "--dry-run"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    flow = shown["flow"]
    assert flow["state_dir"] == str(tmp_path / "d" / "flow")
    assert flow["input"].endswith("corpus-<k>/manifest.csv")
    assert flow["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'd' / 'mlflow.db'}"
    assert flow["train"]["steps"] == 5
    # the corpus and the model agree on the clip shape curation writes
    clips = flow["curate"]["clips"]
    overrides = flow["train"]["model_overrides"]
    assert (clips["width"], clips["height"], clips["num_frames"]) == (
        overrides["width"],
        overrides["height"],
        overrides["num_frames"],
    )
    assert shown["corpus"]["fps"] == clips["fps"] and shown["corpus"]["path_offset"] == 0.0
    assert not (tmp_path / "d").exists()  # a dry run writes nothing


def test_settings_the_demo_owns_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        demo.main(["--state-dir", str(tmp_path), "--set", "flow.state_dir=/elsewhere", "--dry-run"])
    assert exit.value.code == 2
    assert "use --state-dir instead" in capsys.readouterr().err
