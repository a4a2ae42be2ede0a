"""The --config/--set convention every entry point shares: typed, validated, secrets redacted."""

import dataclasses
from typing import Literal

import pytest

from pipelines import settings
from pipelines.settings import ConfigError, check


@dataclasses.dataclass
class Inner:
    steps: int = 10
    lr: float = 1e-4
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass
class Outer:
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = dataclasses.field(default_factory=Inner)
    path: str | None = None
    api_token: str = ""

    def __post_init__(self):
        check(self.inner.steps > 0, f"inner.steps={self.inner.steps} must be > 0")


def test_yaml_then_overrides_resolve_in_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: from-file\ninner:\n  steps: 5\n  lr: 0.5\n")
    cfg = settings.load(Outer, cfg_file, ["inner.steps=7", "sizes=[3, 4, 5]", "inner.mode=b"])
    assert cfg.name == "from-file" and cfg.inner.steps == 7 and cfg.inner.lr == 0.5
    assert cfg.sizes == (3, 4, 5) and cfg.inner.mode == "b"
    assert settings.load(Outer).inner.steps == 10  # defaults need no file


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.stepz=3", "unknown setting.*inner.stepz.*valid keys"),
        ("inner.steps=abc", "inner.steps='abc': expected an integer"),
        ("inner.steps=0", "inner.steps=0 must be > 0"),
        ("inner.mode=c", "inner.mode='c' is not one of"),
        ("sizes=5", "sizes=5: expected a list"),
        ("novalue", "expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key_and_what_is_accepted(override, message):
    with pytest.raises(ConfigError, match=message):
        settings.load(Outer, None, [override])


def test_missing_or_malformed_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        settings.load(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        settings.load(Outer, bad)


def test_flatten_and_dump_redact_secrets():
    cfg = settings.load(Outer, None, ["api_token=sk-live-123", "path=https://bob:hunter2@example.com/x"])
    flat = settings.flatten(settings.to_dict(cfg))
    assert flat["inner.steps"] == 10 and flat["sizes"] == [1, 2]
    assert flat["api_token"] == settings.REDACTED
    assert "hunter2" not in str(flat) and "sk-live-123" not in str(flat)
    dumped = settings.dump(cfg)
    assert "sk-live-123" not in dumped and "hunter2" not in dumped and "steps: 10" in dumped


def test_on_off_words_stay_strings_for_option_values():
    @dataclasses.dataclass
    class Modes:
        mode: Literal["on", "off", "auto"] = "auto"
        flag: bool = False

    assert settings.load(Modes, None, ["mode=off"]).mode == "off"
    assert settings.load(Modes, None, ["flag=true"]).flag is True
    with pytest.raises(ConfigError, match="expected true or false"):
        settings.load(Modes, None, ["flag=yes"])
