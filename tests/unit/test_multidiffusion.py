"""MultiDiffusion over temporal windows for a spatial super-resolution model (model/multidiffusion.py): the
windows, the per-step average of overlapping predictions, no seam at window borders, and the usage errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.multidiffusion import multidiffusion, super_resolve, temporal_windows, training_condition
from model.registry import get_config
from model.text_to_video import TextToVideo
from model.validation import ConfigError

SSR = {"num_frames": 4, "height": 16, "width": 16, "ssr": {"scale": 2}, "unet.extra_in_channels": 3}


def test_windows_cover_the_clip_and_the_step_averages_overlapping_predictions():
    assert temporal_windows(12, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10), (8, 12)]
    assert temporal_windows(11, 4, 3) == [(0, 4), (3, 7), (6, 10), (7, 11)]  # the last window ends at the end
    assert temporal_windows(4, 4, 4) == [(0, 4)]
    # each window predicts its own start index: a frame gets the mean over the windows that hold it
    fn = multidiffusion(lambda x, t, s, e: torch.full_like(x, float(s)), 8, 4, 2)
    out = fn(torch.zeros(1, 1, 8, 1, 1), torch.zeros(1))
    assert out.flatten().tolist() == [0, 0, 1, 1, 3, 3, 4, 4]


def test_a_window_longer_than_the_clip_and_bad_inputs_are_usage_errors():
    with pytest.raises(
        ValueError, match=r"window of 8 frames is longer than the clip \(6 frames\); use a window of at most 6"
    ):
        temporal_windows(6, 8, 4)
    with pytest.raises(ValueError, match="stride=5: must be between 1 and the window"):
        temporal_windows(12, 4, 5)
    with pytest.raises(ConfigError, match="set unet.extra_in_channels=3"):
        get_config("tiny", {"ssr": {"scale": 2}})
    model = TextToVideo.build(get_config("tiny", SSR))
    with pytest.raises(ValueError, match="the low-resolution video is 16x16; this x2 model makes 16x16: give a 8x8"):
        super_resolve(model, np.zeros((6, 16, 16, 3), np.uint8), "a", steps=1)
    with pytest.raises(ValueError, match="window of 8 frames is longer than the clip"):
        super_resolve(model, np.zeros((6, 8, 8, 3), np.uint8), "a", window=8, steps=1)


def test_training_condition_is_the_clip_at_low_resolution():
    x0 = torch.randn(2, 3, 4, 16, 16)
    concat = training_condition(x0, 2)
    assert concat.shape == x0.shape
    # a clip that is already smooth at the low resolution comes back unchanged
    flat = torch.ones(1, 3, 2, 16, 16) * torch.linspace(-1, 1, 3)[None, :, None, None, None]
    assert torch.allclose(training_condition(flat, 2), flat, atol=1e-6)


def _frame_steps(video: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(video.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))  # [f - 1]: frame j -> j + 1


def test_overlapping_windows_leave_no_seam_at_window_borders():
    # A stand-in SSR model that shows the failure MultiDiffusion fixes: each window's prediction is the upsampled
    # condition plus a drift tied to the frame's place in the window (what a video model's frame positions give),
    # so windows disagree where they meet. The real UNet path is the one super_resolve runs above.
    from model.ddim import ddim_sample
    from model.diffusion import DiffusionConfig, Schedule

    schedule = Schedule.from_config(DiffusionConfig(prediction="eps", zero_terminal_snr=False))
    f = 12
    cond = torch.linspace(-0.5, 0.5, f).view(1, 1, f, 1, 1).expand(1, 3, f, 8, 8)  # a steady brightening

    def window_fn(x, t, start, end):
        place = torch.arange(end - start, dtype=x.dtype).view(1, 1, -1, 1, 1)
        x0 = cond[:, :, start:end] + 0.3 * place
        s, r = schedule.coefficients(t, x)
        return (x - s * x0) / r  # the eps that predicts x0

    def sample(stride):
        x_T = torch.randn(1, 3, f, 8, 8, generator=torch.Generator().manual_seed(0))
        video = ddim_sample(multidiffusion(window_fn, f, 4, stride), x_T, schedule, steps=10)
        return video.mean(dim=(0, 1, 3, 4)).diff().abs()  # [f - 1]: frame j -> j + 1

    def borders(stride):
        return {j for s, e in temporal_windows(f, 4, stride) for j in (s - 1, e - 1) if 0 <= j < f - 1}

    blended = sample(2)  # windows overlap by half: every step averages them
    inside = [blended[j] for j in range(f - 1) if j not in borders(2)]
    assert inside and max(blended[j] for j in borders(2)) <= max(inside) * 1.01
    apart = sample(4)  # windows side by side, nothing to blend: the drift jumps back at each border
    assert min(apart[j] for j in borders(4)) > 1.5 * max(apart[j] for j in range(f - 1) if j not in borders(4))


def test_t2v_sample_upscale_writes_the_whole_clip_and_rejects_a_window_longer_than_it(tmp_path, capsys):
    from flows.sample import main
    from pipelines import media

    torch.manual_seed(0)
    path = TextToVideo.build(get_config("tiny", SSR)).save(tmp_path / "ssr.pt")
    media.write_mp4(np.full((10, 8, 8, 3), 120, np.uint8), tmp_path / "low.mp4", 8)
    common = [
        "--checkpoint",
        str(path),
        "--prompt",
        "a red circle",
        "--upscale",
        str(tmp_path / "low.mp4"),
        "--steps",
        "1",
    ]
    assert main([*common, "--window", "4", "--stride", "2", "--out", str(tmp_path / "hi.mp4")]) == 0
    assert media.decode_video_file(tmp_path / "hi.mp4").shape == (10, 16, 16, 3)
    assert main([*common, "--window", "12", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "window of 12 frames is longer than the clip (10 frames)" in capsys.readouterr().err


def test_the_trainer_conditions_a_super_resolution_model_on_the_clip_at_low_resolution():
    from pipelines import loader
    from pipelines.training.config import TrainConfig
    from pipelines.training.worker import Conditioner, branch_loss

    torch.manual_seed(0)
    model = TextToVideo.build(get_config("tiny", SSR))
    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    items = [loader.Item("k", "video_text", "a red circle", frames, frames[0])]
    seen = {}

    def net(*args, **kwargs):
        seen.update(kwargs)
        return model.unet(*args, **kwargs)

    cond = Conditioner(model, TrainConfig(data=[]), torch.device("cpu"))
    out = branch_loss(net, model, cond, items, "motion", TrainConfig(data=[]), torch.Generator(), torch.Generator())
    assert out["loss"].requires_grad
    torch.testing.assert_close(seen["concat"], training_condition(cond.latents(items, None), 2))
