"""Lumiere's masked conditioning (model/masked.py, flows/masked_inputs.py): the training conditions per task, the
task rates, the trainer passing the condition to the UNet, and ``t2v sample --image / --inpaint / --cinemagraph``
with their usage errors, on the tiny model (CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from flows.benchmarks import masked as bench
from flows.benchmarks.masked import psnr
from flows.masked_inputs import masked_concat
from flows.sample import main
from model import masked
from model.registry import get_config
from model.text_to_video import TextToVideo
from model.validation import ConfigError
from pipelines import media

F, H, W = 4, 16, 16
MASKED = {"num_frames": F, "height": H, "width": W, "masked": {}, "unet.extra_in_channels": 4}


def test_each_task_gives_its_condition_and_target():
    x0 = torch.randn(4, 3, F, H, W)
    target, concat, tasks = masked.training_condition(
        x0, masked.MaskedConfig(), torch.Generator().manual_seed(0), tasks=list(masked.TASKS)
    )
    given, mask = concat[:, :3], concat[:, 3:]
    assert concat.shape == (4, 4, F, H, W)
    # image-to-video: the first frame given, nothing else
    assert mask[0, :, 0].eq(1).all() and mask[0, :, 1:].eq(0).all()
    assert torch.equal(given[0, :, 0], x0[0, :, 0]) and given[0, :, 1:].eq(0).all()
    # inpainting: one box blank in every frame, the video given around it
    box = mask[1, 0] == 0  # [f, h, w]
    assert box.any() and (~box).any() and all(torch.equal(box[0], box[j]) for j in range(F))
    assert torch.equal(given[1][:, ~box], x0[1][:, ~box]) and torch.equal(target[1], x0[1])
    # cinemagraph: the first frame repeated; outside the region the target holds still, inside it moves
    region = mask[2, 0, 1] == 0  # [h, w]
    assert mask[2, :, 0].eq(1).all() and region.any() and (~region).any()
    for j in range(F):
        assert torch.equal(target[2, :, j][:, ~region], x0[2, :, 0][:, ~region])
        assert torch.equal(target[2, :, j][:, region], x0[2, :, j][:, region])
    # text-to-video: nothing given
    assert concat[3].eq(0).all() and torch.equal(target[3], x0[3])


def test_tasks_are_drawn_per_sample_at_the_configured_rates():
    cfg = masked.MaskedConfig(image_to_video=0.5, inpaint=0.2, cinemagraph=0.1)
    tasks = masked.draw_tasks(4000, cfg, torch.Generator().manual_seed(0))
    share = {t: tasks.count(t) / len(tasks) for t in masked.TASKS}
    for task, rate in zip(masked.TASKS, (0.5, 0.2, 0.1, 0.2)):
        assert share[task] == pytest.approx(rate, abs=0.03), task
    with pytest.raises(ConfigError, match="together at most 1"):
        masked.MaskedConfig(image_to_video=0.6, inpaint=0.6)
    with pytest.raises(ConfigError, match="set unet.extra_in_channels=4"):
        get_config("tiny", {"masked": {}})


def test_the_trainer_gives_the_unet_each_sample_s_condition():
    from pipelines import loader
    from pipelines.training.config import TrainConfig
    from pipelines.training.worker import Conditioner, branch_loss

    torch.manual_seed(0)
    model = TextToVideo.build(
        get_config("tiny", {**MASKED, "masked.image_to_video": 1.0, "masked.inpaint": 0.0, "masked.cinemagraph": 0.0})
    )
    cfg = TrainConfig(data=[])
    frames = np.random.default_rng(0).integers(0, 255, (F, H, W, 3), dtype=np.uint8)
    items = [loader.Item(f"k{i}", "video_text", "a red circle", frames, frames[0]) for i in range(2)]
    seen = {}

    def net(*args, **kwargs):
        seen.update(kwargs)
        return model.unet(*args, **kwargs)

    cond = Conditioner(model, cfg, torch.device("cpu"))
    out = branch_loss(net, model, cond, items, "motion", cfg, torch.Generator().manual_seed(1), torch.Generator())
    assert out["loss"].requires_grad
    concat = seen["concat"]  # every sample image-to-video: its first frame given, the rest masked out
    assert concat.shape == (2, 4, F, H, W) and concat[:, 3, 0].eq(1).all() and concat[:, 3, 1:].eq(0).all()
    torch.testing.assert_close(concat[:, :3, 0], cond.latents(items[:1], None)[0, :, 0].expand(2, -1, -1, -1))


@pytest.fixture(scope="module")
def masked_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = TextToVideo.build(get_config("tiny", MASKED))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh UNet predicts zeros; make it behave like a trained one
        for p in model.unet.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.save(tmp_path_factory.mktemp("masked") / "model.pt")


def _png(path, image):
    from PIL import Image

    Image.fromarray(image).save(path)
    return str(path)


def test_given_pixels_come_back_exactly_and_the_rest_is_generated(masked_checkpoint):
    model = TextToVideo.from_checkpoint(masked_checkpoint)
    video = np.random.default_rng(0).integers(0, 255, (F, H, W, 3), dtype=np.uint8)
    region = torch.zeros(H, W)
    region[4:12, 4:12] = 1
    concat = masked.inpaint(model.encode_video(video[None])[0], region)
    out = model.generate(["a red circle moving left"], steps=2, seed=0, concat=concat)[0]
    keep = region.numpy() == 0
    assert np.abs(out[:, keep].astype(int) - video[:, keep]).max() <= 1  # kept exactly (up to uint8 rounding)
    assert np.abs(out[:, ~keep].astype(int) - video[:, ~keep]).mean() > 10  # the region is new content
    raw = model.generate(["a red circle moving left"], steps=2, seed=0, concat=concat, composite=False)[0]
    assert np.array_equal(raw[:, ~keep], out[:, ~keep])  # the same sample, only the given pixels not pasted back
    assert psnr(raw, video, keep) < psnr(out, video, keep)


def test_guidance_acts_only_where_the_model_generates(masked_checkpoint, monkeypatch):
    model = TextToVideo.from_checkpoint(masked_checkpoint)
    region = torch.zeros(H, W)
    region[4:12, 4:12] = 1
    concat = masked.inpaint(torch.zeros(model.config.unet.in_channels, F, H, W), region)
    scale = masked.guidance_map(concat, 7.0)  # [1, 1, f, h, w]
    assert scale.shape == (1, 1, F, H, W)
    assert (scale[0, 0][:, region == 1] == 7.0).all() and (scale[0, 0][:, region == 0] == 1.0).all()
    assert masked.guidance_map(concat, 1.0) == 1.0

    from model import ddim

    seen, real = [], ddim.guided  # the scale the sampler is given, recorded on its way in
    monkeypatch.setattr(ddim, "guided", lambda unet, c, u, g: seen.append(g) or real(unet, c, u, g))
    model.generate(["a red circle moving left"], steps=1, guidance=7.0, seed=0, concat=concat)
    model.generate(["a red circle moving left"], steps=1, guidance=7.0, seed=0)
    assert torch.equal(seen[0], scale.to(seen[0])) and seen[1] == 7.0  # text-to-video: one scale everywhere


def test_sample_inpaint_image_and_cinemagraph_keep_what_is_given(masked_checkpoint, tmp_path):
    # Smooth content: the output goes through H.264 (4:2:0 chroma), which blurs pixel noise across the mask edge.
    ramp = np.linspace(40, 220, W, dtype=np.float64)
    video = np.stack([np.stack([np.roll(ramp, 2 * j)[None].repeat(H, 0)] * 3, -1) for j in range(F)]).astype(np.uint8)
    media.write_mp4(video, tmp_path / "in.mp4", 8)
    video = media.decode_video_file(tmp_path / "in.mp4")  # what the command reads (after H.264)
    region = np.zeros((H, W, 3), np.uint8)
    region[4:12, 4:12] = 255
    mask = _png(tmp_path / "mask.png", region)
    common = ["--checkpoint", str(masked_checkpoint), "--prompt", "a red circle moving left", "--steps", "2"]

    assert main([*common, "--inpaint", str(tmp_path / "in.mp4"), "--mask", mask, "--out", str(tmp_path / "a.mp4")]) == 0
    out = media.decode_video_file(tmp_path / "a.mp4")
    keep = region[..., 0] == 0
    assert out.shape == video.shape and psnr(out[:, keep], video[:, keep]) >= 30  # unmasked pixels kept

    first = _png(tmp_path / "first.png", video[0])
    assert main([*common, "--image", first, "--out", str(tmp_path / "b.mp4")]) == 0
    assert psnr(media.decode_video_file(tmp_path / "b.mp4")[0], video[0]) >= 30  # the video starts from it

    assert main([*common, "--cinemagraph", first, "--mask", mask, "--out", str(tmp_path / "c.mp4")]) == 0
    out = media.decode_video_file(tmp_path / "c.mp4")
    # H.264's transform blocks carry some of the untrained model's noise inside the region past its edge
    far = np.ones((H, W), bool)
    far[2:14, 2:14] = False
    for j in range(F):  # outside the region every frame is the image
        assert psnr(out[j][far], video[0][far]) >= 30


def test_bad_masked_inputs_are_usage_errors_that_say_what_is_expected(
    masked_checkpoint, tiny_checkpoint, tmp_path, capsys
):
    common = ["--checkpoint", str(masked_checkpoint), "--prompt", "a red circle", "--steps", "1"]
    small = _png(tmp_path / "small.png", np.zeros((8, 8, 3), np.uint8))
    right = _png(tmp_path / "right.png", np.zeros((H, W, 3), np.uint8))
    media.write_mp4(np.zeros((F, H, W, 3), np.uint8), tmp_path / "v.mp4", 8)
    media.write_mp4(np.zeros((F + 2, H, W, 3), np.uint8), tmp_path / "long.mp4", 8)
    model = TextToVideo.from_checkpoint(masked_checkpoint)
    v, long = str(tmp_path / "v.mp4"), str(tmp_path / "long.mp4")
    cases = [  # (image, inpaint, cinemagraph, mask) -> the message
        ((small, None, None, None), "the image is 8x8; the model makes 16x16 frames: give a 16x16 image"),
        ((None, v, None, small), "the mask is 8x8; expected 16x16"),
        ((None, v, None, long), "6 frames of 16x16; expected 4 frames of 16x16"),
        ((None, long, None, right), "6 frames of 16x16; the model makes 4 frames of 16x16"),
        ((None, v, None, None), "--inpaint needs --mask"),
        ((None, None, right, v), "takes one mask image"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            masked_concat(model, *args)
    # the command turns them into a usage error (exit 2) with the message
    assert main([*common, "--image", small, "--out", str(tmp_path / "x.mp4")]) == 2
    assert "give a 16x16 image" in capsys.readouterr().err
    # a model without masked conditioning says how to get one
    assert main(["--checkpoint", str(tiny_checkpoint), "--prompt", "a", "--cinemagraph", right, "--mask", right]) == 2
    assert "has no masked conditioning" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--mask", right])  # a mask alone
    assert "--mask goes with --inpaint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# t2v bench masked: its scores and its command line (the benchmark itself trains; it is not run here)


def test_psnr_counts_only_the_kept_pixels():
    reference = np.full((2, 4, 4, 3), 100, np.uint8)
    video = reference + np.uint8(10)  # off by 10 everywhere: MSE 100
    keep = np.ones((4, 4), bool)
    keep[1:3, 1:3] = False
    video[:, 1:3, 1:3] = 0  # far off, but inside the box
    assert psnr(video, reference, keep) == pytest.approx(10 * np.log10(255**2 / 100))  # 28.13 dB
    assert psnr(video, reference) < 20  # the box counts when nothing is left out
    assert psnr(reference, reference, keep) == float("inf")


def test_the_box_colour_is_read_inside_the_box_only():
    from pipelines import shapes

    def clip(colour):
        return shapes.render_video(colour, "circle", "right", 16, 16, 6, size=6.4, travel=0.8)

    box = bench.path_box(clip("red"), margin=1)
    assert box[8].all() and not box[0].any()  # the band the shape crosses, full width
    assert bench.region_colour(clip("red"), box) == "red"
    assert bench.region_colour(clip("blue"), box) == "blue"  # a wrong-colour clip does not pass as red
    outside = clip("blue")
    assert not box[1:3, 4:12].any()
    outside[:, 1:3, 4:12] = shapes.COLOURS["green"]  # another shape outside the box does not count
    assert bench.region_colour(outside, box) == "blue"
    assert bench.region_colour(clip("red"), ~box) is None  # nothing there


def test_the_masked_benchmark_scores_generation_from_a_first_frame_and_inpainting(tmp_path):
    cfg = bench.MaskedBenchConfig(samples=2, steps=1)
    overrides = {"unet.model_channels": 8, "unet.num_groups": 4}
    torch.manual_seed(0)
    mc = get_config("tiny", {**bench.settings.to_dict(cfg.train)["model_overrides"], **overrides})
    path = TextToVideo.build(mc).save(tmp_path / "model.pt")
    refs = bench.references(2, mc.fps, cfg.corpus, cfg.margin)
    assert all(r["inpaint_colour"] != r["colour"] and r["inpaint_colour"] in r["inpaint_prompt"] for r in refs)
    assert all(bench.region_colour(r["clip"], r["box"]) == r["colour"] for r in refs)  # the box holds the shape
    rows = bench.evaluate(str(path), cfg)
    assert list(rows) == list(bench.WAYS)
    assert all(0 <= r["colour_accuracy"] <= 1 and 0 <= r["direction_accuracy"] <= 1 for r in list(rows.values())[:2])
    # an untrained model keeps the given pixels only because they are pasted back
    assert rows["inpainting"]["psnr_user_db"] >= 30 > rows["inpainting"]["psnr_raw_db"]
    assert rows["inpainting, no guidance"]["psnr_user_db"] >= 30
    assert "PSNR outside the box" in bench.render(rows, cfg, steps=10)


def test_t2v_bench_masked_command_line(capsys):
    assert bench.main(["--dry-run", "--minutes", "1", "--samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "minutes: 1.0" in out and "samples: 4" in out and "image_to_video: 0.3" in out
    with pytest.raises(SystemExit) as e:
        bench.main(["--samples", "0", "--dry-run"])
    assert e.value.code == 2 and "samples and steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main(["--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
