"""Shared fixtures: a tiny shapes corpus (real mp4/png/jpg files) made once per test session."""

from __future__ import annotations

import os

import pytest

# Keep the 2-core CI machine responsive: one intra-op thread per process unless a test asks for more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture(scope="session")
def shapes_corpus(tmp_path_factory):
    """A tiny generated corpus: 8 videos (2 text-free) + 6 images at 32x32, 12 fps, 2 s. Returns the manifest path."""
    from pipelines import shapes

    cfg = shapes.CorpusConfig(
        num_videos=8, num_images=6, width=32, height=32, fps=12, seconds=2.0, text_free_fraction=0.25, seed=7
    )
    return shapes.generate(cfg, tmp_path_factory.mktemp("shapes"), progress=False)
