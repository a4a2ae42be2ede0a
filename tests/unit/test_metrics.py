"""Video metrics: Frechet distance against direct computation, a TorchScript feature network, CLIP metrics on the
project's tiny CLIP, and shapes accuracy on rendered shapes videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import metrics


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


def _direct_frechet(mu1, s1, mu2, s2) -> float:
    """Tr((s1 s2)^(1/2)) = Tr((s1^(1/2) s2 s1^(1/2))^(1/2)), a symmetric PSD matrix: eigenvalues, no sqrtm."""
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_frechet_distance_matches_direct_computation_on_known_gaussians():
    rng = np.random.default_rng(0)
    for d in (1, 3, 8):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_direct_frechet(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: sum over dims of (sqrt(a) - sqrt(b))^2 plus the mean term
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 3.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(expected)
    # same Gaussian: zero
    rng = np.random.default_rng(1)
    s = _spd(rng, 5)
    assert metrics.frechet_distance(np.ones(5), s, np.ones(5), s) == pytest.approx(0.0, abs=1e-6)


def test_fvd_from_samples_approaches_the_population_distance():
    rng = np.random.default_rng(2)
    d = 4
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = np.eye(d), np.diag([1.0, 2.0, 0.5, 1.0])
    x = rng.multivariate_normal(mu1, s1, size=20000)
    y = rng.multivariate_normal(mu2, s2, size=20000)
    assert metrics.fvd_from_features(x, y) == pytest.approx(_direct_frechet(mu1, s1, mu2, s2), abs=0.05)


def test_frechet_distance_with_singular_covariances_is_finite():
    # fewer samples than dimensions: rank-deficient covariances (what a small evaluation gives)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 16)), rng.normal(size=(4, 16)) + 1.0
    value = metrics.fvd_from_features(x, y)
    assert np.isfinite(value) and value > 0


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="n >= 2"):
        metrics.gaussian_stats(np.zeros((1, 4)))


class _TinyVideoNet(torch.nn.Module):
    """A stand-in for an I3D: pooled colour statistics through a fixed linear layer (tests cannot download I3D)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 8)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:  # [b, 3, f, h, w]
        stats = torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)  # [b, 6]
        out = self.proj(stats)
        return out if return_features else out.softmax(-1)


@pytest.fixture(scope="module")
def feature_net_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fvd") / "tiny_video_net.pt"
    torch.jit.save(torch.jit.script(_TinyVideoNet()), str(path))
    return path


def _videos(rng, n, shift=0):
    return np.clip(rng.integers(0, 200, size=(n, 4, 16, 16, 3)) + shift, 0, 255).astype(np.uint8)


def test_video_feature_net_from_torchscript(feature_net_path):
    net = metrics.VideoFeatureNet(feature_net_path, size=32, call_kwargs={"return_features": True})
    rng = np.random.default_rng(0)
    real = _videos(rng, 6)
    x = net.prepare(real[:2])
    assert x.shape == (2, 3, 4, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    feats = net(real, batch_size=4)
    assert feats.shape == (6, 8)
    # FVD to itself is zero; a brighter set is farther than a fresh draw of the same distribution
    assert metrics.fvd_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
    same = metrics.fvd_from_features(feats, net(_videos(rng, 6)))
    brighter = metrics.fvd_from_features(feats, net(_videos(rng, 6, shift=80)))
    assert brighter > same


def test_video_feature_net_errors_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="TorchScript"):
        metrics.VideoFeatureNet(tmp_path / "missing.pt")
    bad = tmp_path / "not_script.pt"
    torch.save({"a": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        metrics.VideoFeatureNet(bad)


@pytest.fixture(scope="module")
def tiny_scorer():
    from model.encoders import load_openclip

    clip, _, tokenizer = load_openclip("t2v-tiny-clip", seed=0)
    return metrics.ClipScorer(clip, tokenizer, image_size=224)


def test_clip_metrics_static_and_moving_videos(tiny_scorer):
    from pipelines.shapes import render_image, render_video

    static = np.repeat(render_image("red", "circle", 32, 32)[None], 6, axis=0)
    moving = render_video("blue", "square", "left", 32, 32, 6)
    emb = tiny_scorer.frames(static)
    assert emb.shape[0] == 6
    assert torch.allclose(emb.norm(dim=-1), torch.ones(6), atol=1e-5)
    # identical frames: consistency 1; CLIPSIM equals the single-frame cosine
    assert metrics.frame_consistency(emb) == pytest.approx(1.0, abs=1e-5)
    text = tiny_scorer.text(["a red circle"])[0]
    assert metrics.clipsim(text, emb) == pytest.approx(float(emb[0] @ text), abs=1e-5)
    out = metrics.clip_metrics(tiny_scorer, [static, moving], ["a red circle", "a blue square moving left"])
    assert set(out) == {"clipsim", "frame_consistency"}
    assert -1 <= out["clipsim"] <= 1
    moving_consistency = metrics.frame_consistency(tiny_scorer.frames(moving))
    assert moving_consistency < 1.0
    assert out["frame_consistency"] == pytest.approx((1.0 + moving_consistency) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="2 videos for 1 prompts"):
        metrics.clip_metrics(tiny_scorer, [static, moving], ["x"])


def test_shapes_metrics_read_colour_and_direction():
    from pipelines.shapes import render_video

    videos = [render_video("red", "circle", "left", 48, 48, 12), render_video("green", "square", "up", 48, 48, 12)]
    assert metrics.shapes_metrics(videos, [("red", "left"), ("green", "up")]) == {
        "colour_accuracy": 1.0,
        "direction_accuracy": 1.0,
        "shapes_accuracy": 1.0,
    }
    half = metrics.shapes_metrics(videos, [("red", "right"), ("green", "up")])
    assert half == {"colour_accuracy": 1.0, "direction_accuracy": 0.5, "shapes_accuracy": 0.5}
    still = np.zeros((12, 48, 48, 3), np.uint8)  # nothing drawn: nothing detected
    assert metrics.shapes_metrics([still], [("red", "left")])["shapes_accuracy"] == 0.0


def test_which_way_is_better():
    assert metrics.is_better("clipsim", 0.31, 0.30)
    assert not metrics.is_better("clipsim", 0.30, 0.30)  # a tie does not win
    assert metrics.is_better("fvd", 400.0, 550.0)  # lower FVD is better
    assert not metrics.is_better("fvd", 549.0, 550.0, min_delta=5.0)
    assert not metrics.is_better("shapes_accuracy", float("nan"), 0.1)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.is_better("accuracy", 1, 0)
