"""Every DeepSpeed config under clusters/deepspeed/ loads through the training config and DeepSpeed's own parser,
and the parser catches a misspelt key (tests/unit/test_cluster_files.py checks the other cluster files)."""

from __future__ import annotations

from pathlib import Path

import pytest

# (tests/unit/test_cluster_files.py checks there are at least three)
DEEPSPEED = sorted((Path(__file__).resolve().parents[2] / "clusters" / "deepspeed").glob("*.yaml"))


@pytest.fixture(scope="module")
def deepspeed_config_cls():
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_configs_load_through_the_train_config(path, deepspeed_config_cls):
    from pipelines import settings
    from pipelines.training.config import TrainConfig
    from pipelines.training.worker import deepspeed_config

    cfg = settings.load(TrainConfig, path)
    ds = deepspeed_config(cfg, world_size=1, branches=2)  # what each worker hands to deepspeed.initialize
    parsed = deepspeed_config_cls(ds)  # DeepSpeed's own parser (rejects unknown keys)
    assert parsed.zero_optimization_stage == cfg.zero_stage
    name = path.stem
    if name.startswith("h100"):
        assert cfg.use_gpu and parsed.bfloat16_config.enabled
        assert cfg.num_workers == int(name.split("x")[1].split("-")[0])  # h100x8 -> 8 workers
    if "zero3" in name:
        assert cfg.zero_stage == 3 and parsed.zero_config.offload_optimizer is not None
        assert parsed.zero_config.offload_param is not None
    if "zero2" in name:
        assert cfg.zero_stage == 2


def test_a_deepspeed_typo_is_caught(deepspeed_config_cls):
    with pytest.raises(Exception, match="offload_optimiser"):
        deepspeed_config_cls(
            {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3, "offload_optimiser": {"device": "cpu"}},
            }
        )
