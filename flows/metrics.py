"""The video metrics, for flows and tests that import them from here: they live in ``pipelines/metrics.py``, where
training's periodic evaluation can use them too (pipelines never imports flows)."""

from pipelines.metrics import (  # noqa: F401
    HIGHER_IS_BETTER,
    ClipScorer,
    VideoFeatureNet,
    clip_metrics,
    clipsim,
    frame_consistency,
    frechet_distance,
    fvd_from_features,
    gaussian_stats,
    higher_is_better,
    is_better,
    shapes_metrics,
)
