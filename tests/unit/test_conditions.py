"""Structure conditions: the encoder that feeds the UNet's extra input channels (zero at start, any subset,
VideoComposer's dropout), and extracting motion vectors, edge maps and depth from generated clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.conditions import CHANNELS, ConditionConfig, ConditionEncoder, keep_masks
from model.registry import get_config
from model.unet import build_unet
from pipelines import media, schema, settings, shapes
from pipelines.curation.config import CurateConfig
from pipelines.curation.stages import new_row, to_rows
from pipelines.curation.stages.conditions import (
    ConditionError,
    DepthEstimator,
    ExtractConditions,
    edge_map,
    motion_field,
)
from pipelines.curation.stages.write import sample_from_row
from pipelines.settings import ConfigError

KINDS = ("depth", "sketch", "motion")


def _conditions(b=2, f=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(b, CHANNELS[k], f, size, size, generator=g) * 2 - 1 for k in KINDS}


def test_a_fresh_encoder_leaves_the_unet_unchanged_and_then_learns(small_model):
    torch.manual_seed(0)
    cond = {"kinds": list(KINDS), "hidden": 16}
    unet = build_unet(get_config("tiny", {**small_model, "unet.extra_in_channels": 8, "unet.conditions": cond}).unet)
    unet.eval()
    assert unet.condition_encoder is not None  # a submodule: DeepSpeed, the EMA and checkpoints carry it
    with torch.no_grad():  # a trained UNet: its zero-initialised layers have grown, the encoder's output has not
        for name, p in unet.named_parameters():
            if not name.startswith("condition_encoder.") and not p.any():
                p.normal_(0, 0.02)
    x, t = torch.randn(2, unet.cfg.in_channels, 4, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, conditions=_conditions()), unet(x, t))
    opt = torch.optim.SGD(unet.condition_encoder.parameters(), lr=0.1)
    unet(x, t, conditions=_conditions()).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():  # the zero output layer is trainable: now the conditions steer the output
        assert not torch.allclose(unet(x, t, conditions=_conditions()), unet(x, t))


def test_the_unet_says_what_conditions_it_takes(small_model):
    plain = build_unet(get_config("tiny", small_model).unet)
    x, t = torch.randn(1, plain.cfg.in_channels, 2, 16, 16), torch.tensor([10])
    with pytest.raises(ValueError, match="has no condition encoder"):
        plain(x, t, conditions={"sketch": torch.zeros(1, 1, 2, 16, 16)})
    with pytest.raises(ConfigError, match="needs as many extra input channels"):
        get_config("tiny", {**small_model, "unet.conditions": {"kinds": ["sketch"]}})
    with pytest.raises(ConfigError, match="set unet.conditions.downsample=1"):  # pixel space: no downsampling
        get_config(
            "tiny",
            {**small_model, "unet.extra_in_channels": 8, "unet.conditions": {"kinds": ["sketch"], "downsample": 8}},
        )
    cond = {"kinds": ["sketch"], "hidden": 16}
    unet = build_unet(get_config("tiny", {**small_model, "unet.extra_in_channels": 8, "unet.conditions": cond}).unet)
    with pytest.raises(ValueError, match="give conditions of 16x16 pixels"):
        unet(x, t, conditions={"sketch": torch.zeros(1, 1, 2, 32, 32)})


def test_any_subset_works_and_a_dropped_condition_is_an_absent_one():
    torch.manual_seed(0)
    encoder = ConditionEncoder(ConditionConfig(kinds=KINDS, hidden=16, downsample=2))
    torch.nn.init.normal_(encoder.out.weight)  # a trained encoder: outputs differ between subsets
    cond = _conditions(size=32)
    assert encoder({}, num_frames=4) is None
    outs = {k: encoder({k: cond[k]}, num_frames=4) for k in KINDS}
    assert all(o.shape == (2, 8, 4, 16, 16) for o in outs.values())  # downsampled to the UNet's resolution
    assert not torch.allclose(outs["depth"], outs["motion"])
    keep = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # sketch and motion dropped for both samples
    torch.testing.assert_close(encoder(cond, num_frames=4, keep=keep), outs["depth"])
    image = encoder({"depth": cond["depth"][:, :, :1]}, num_frames=4)  # a depth image, repeated over frames
    assert image.shape == (2, 8, 4, 16, 16)


def test_dropout_follows_videocomposers_all_zero_all_keep_then_each():
    cfg = ConditionConfig(kinds=KINDS, p_all_zero=0.2, p_all_keep=0.3, p_each=0.5)
    masks = keep_masks(20000, cfg, torch.Generator().manual_seed(0))
    kept = masks.sum(1)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert (kept == 0).float().mean() == pytest.approx(0.2 + 0.5 * 0.125, abs=0.015)
    assert (kept == 3).float().mean() == pytest.approx(0.3 + 0.5 * 0.125, abs=0.015)
    assert masks.mean(0).tolist() == pytest.approx([0.3 + 0.5 * 0.5] * 3, abs=0.015)


@pytest.mark.parametrize(
    ("conditions", "words"),
    [
        ({"flow": torch.zeros(1, 2, 4, 16, 16)}, "not among this model's conditions"),
        ({"motion": torch.zeros(1, 1, 4, 16, 16)}, "expected [batch, 2, 4 or 1 frames"),
        ({"sketch": torch.zeros(1, 1, 3, 16, 16)}, "expected [batch, 1, 4 or 1 frames"),
        ({"sketch": torch.zeros(1, 1, 4, 16, 16), "depth": torch.zeros(1, 1, 4, 8, 8)}, "give them all one size"),
        ({"depth": torch.zeros(1, 1, 4, 18, 18)}, "not divisible by the encoder's downsample factor 4"),
    ],
)
def test_a_condition_of_the_wrong_kind_size_or_frame_count_says_what_is_expected(conditions, words):
    encoder = ConditionEncoder(ConditionConfig(kinds=KINDS, hidden=16, downsample=4))
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        encoder(conditions, num_frames=4)


def test_config_errors_name_the_accepted_values():
    with pytest.raises(ConfigError, match=r"unet.conditions.kinds: unknown \['normals'\]; accepted are"):
        ConditionConfig(kinds=("normals",))
    with pytest.raises(ConfigError, match="power of two"):
        ConditionConfig(kinds=("depth",), downsample=3)
    with pytest.raises(ConfigError, match="probability"):
        ConditionConfig(kinds=("depth",), p_each=1.5)


@pytest.mark.parametrize(("direction", "axis", "sign"), [("right", 0, 1), ("left", 0, -1), ("up", 1, -1)])
def test_motion_vectors_from_the_h264_stream_point_where_the_shape_moves(direction, axis, sign):
    video = shapes.render_video("red", "square", direction, 64, 64, 12, travel=0.6)
    field = motion_field(media.encode_mp4(video, 8.0), 12, 64, 64).astype(np.float32)
    assert field.shape == (12, 2, 64, 64)
    assert np.abs(field[0]).max() == 0  # the first frame is an I-frame: no vectors
    moving = field[:, axis][np.abs(field[:, axis]) > 0]
    assert moving.size > 0 and sign * np.median(moving) > 0
    # about 0.6 of the frame in 11 frame steps: 0.05 of the frame per frame where something moves
    assert 0.02 < abs(float(np.median(moving))) < 0.15


def test_motion_vectors_of_a_clip_of_another_size_or_not_video():
    data = media.encode_mp4(shapes.render_video("red", "square", "right", 32, 32, 4), 8.0)
    with pytest.raises(ConditionError, match="expected 64x64"):
        motion_field(data, 4, 64, 64)
    with pytest.raises(ConditionError, match="unreadable"):
        motion_field(b"not a video", 4, 32, 32)


def test_edge_map_outlines_the_shape():
    video = shapes.render_video("blue", "square", "right", 48, 48, 2, travel=0.0)
    edges = edge_map(video)
    assert edges.shape == (2, 1, 48, 48) and edges.dtype == np.uint8
    ys, xs = np.nonzero(edges[0, 0])
    # the outline hugs the square: its centre is the frame's, and the square's inside is empty
    assert abs(ys.mean() - 23.5) < 2 and abs(xs.mean() - 23.5) < 2
    assert edges[0, 0, 24, 24] == 0 and edges[0, 0, 0, 0] == 0
    assert edge_map(np.zeros((1, 8, 8, 3), np.uint8)).max() == 0
    with pytest.raises(ConditionError, match=r"\[f, h, w, 3\]"):
        edge_map(np.zeros((8, 8, 3), np.uint8))


class _TinyDepthNet(torch.nn.Module):
    """Stand-in for a MiDaS/DPT network (none can be downloaded here): brightness as inverse depth."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).squeeze(1)


def test_depth_from_a_local_exported_network(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "depth.pt2"
    torch.export.save(torch.export.export(_TinyDepthNet(), (torch.zeros(1, 3, 32, 32),)), str(path))
    depth = DepthEstimator(path, size=32)(shapes.render_video("green", "circle", "down", 40, 24, 3))
    assert depth.shape == (3, 1, 24, 40) and depth.dtype == np.float16
    assert float(depth.min()) == 0.0 and float(depth.max()) == 1.0  # normalised per clip
    with pytest.raises(FileNotFoundError, match="local .pt2"):
        DepthEstimator(tmp_path / "missing.pt2")
    for name in ("junk.pt2", "junk.pt"):
        (tmp_path / name).write_bytes(b"junk")
        with pytest.raises(ValueError, match="not a depth network"):
            DepthEstimator(tmp_path / name)


def _row(kind: str, frames: np.ndarray) -> dict:
    is_video = kind != "image"
    return new_row(
        source=f"/data/{kind}.mp4",
        media_type="video" if is_video else "image",
        kind=kind,
        key=f"k_{kind}",
        caption=None if kind == "video" else "a red square moving right",
        media=media.encode_mp4(frames, 8.0) if is_video else media.encode_jpg(frames[0]),
        num_frames=frames.shape[0],
        fps=8.0,
        width=frames.shape[2],
        height=frames.shape[1],
    )


def test_the_curation_stage_stores_conditions_as_sample_members_and_records_failures(tmp_path):
    torch.manual_seed(0)
    wrong = tmp_path / "wrong.pt2"  # a network whose output is not a depth map: depth fails, the clip stays
    torch.export.save(torch.export.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 32, 32),)), str(wrong))
    cfg = settings.load(
        CurateConfig,
        overrides=[
            "conditions.kinds=[motion,sketch,depth]",
            f"conditions.depth_model={wrong}",
            "conditions.depth_size=32",
        ],
    )
    video = shapes.render_video("red", "square", "right", 32, 32, 8)
    rows = to_rows(ExtractConditions(cfg)([_row("video", video), _row("image", video[:1])]))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    samples = [schema.decode_sample(sample_from_row(r)) for r in rows]
    clip, image = samples
    assert clip.arrays["motion"].shape == (8, 2, 32, 32) and clip.arrays["sketch"].shape == (8, 1, 32, 32)
    assert "motion" not in image.arrays and image.arrays["sketch"].shape == (1, 1, 32, 32)  # images have no motion
    assert "depth" not in clip.arrays
    assert "depth network returned shape" in clip.meta.extra["condition_errors"]["depth"]
    cfg.conditions.depth_size = 64  # not the side the exported network takes: said per clip, the clip stays
    rows = to_rows(ExtractConditions(cfg)([_row("video", video)]))
    assert (
        rows[0]["status"] == "ok"
        and "set conditions.depth_size" in json.loads(rows[0]["extra"])["condition_errors"]["depth"]
    )


def test_condition_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="accepted are"):
        settings.load(CurateConfig, overrides=["conditions.kinds=[flow]"])
    with pytest.raises(ConfigError, match="depth needs a local network file"):
        settings.load(CurateConfig, overrides=["conditions.kinds=[depth]"])


def test_the_loader_delivers_conditions_at_the_items_frames_and_size():
    from pipelines import loader

    video = shapes.render_video("red", "square", "right", 32, 32, 8)
    meta = schema.SampleMeta(source="/d/v.mp4", kind="video", num_frames=8, fps=8.0, width=32, height=32)
    sketch = edge_map(video)
    motion = np.full((8, 2, 32, 32), 0.05, np.float16)
    raw = schema.encode_sample("k", meta, media.encode_mp4(video, 8.0), arrays={"sketch": sketch, "motion": motion})
    decoder = loader.Decoder(4, 16, 16, condition_kinds=("sketch", "motion", "depth"))
    item = decoder(raw)
    assert sorted(item.conditions) == ["motion", "sketch"]  # no depth stored: none delivered
    assert item.conditions["sketch"].shape == (1, 4, 16, 16) and item.conditions["motion"].shape == (2, 4, 16, 16)
    assert set(np.unique(item.conditions["sketch"])) <= {-1.0, 1.0}  # 0/1 edges -> -1/1, resized nearest
    np.testing.assert_allclose(item.conditions["motion"], 0.5, atol=1e-3)  # 0.05 of the frame per frame -> 0.5
    bad = schema.encode_sample("k2", meta, media.encode_mp4(video, 8.0), arrays={"sketch": sketch[:2]})
    item = decoder(bad)  # a condition of another frame count is left out; the sample stays
    assert item is not None and item.conditions == {} and decoder.stats["condition_errors"] == 1


def test_training_feeds_every_kind_with_its_keep_mask(small_model):
    from model.text_to_video import TextToVideo
    from pipelines import loader
    from pipelines.training.config import TrainConfig
    from pipelines.training.worker import Conditioner, branch_loss

    torch.manual_seed(0)
    cond_cfg = {"kinds": ["sketch", "motion"], "hidden": 16, "p_all_zero": 0.0, "p_all_keep": 1.0}
    overrides = {**small_model, "num_frames": 2, "height": 16, "width": 16, "unet.extra_in_channels": 8}
    model = TextToVideo.build(get_config("tiny", {**overrides, "unet.conditions": cond_cfg}))
    cfg = TrainConfig(data=[])
    cond = Conditioner(model, cfg, torch.device("cpu"))
    items = []
    for i in range(4):
        frames = np.zeros((2, 16, 16, 3), np.uint8)
        item = loader.Item(f"k{i}", "video_text", f"clip {i}", frames, frames[0])
        if i % 2 == 0:  # half the clips have a sketch, none has motion
            item.conditions = {"sketch": np.ones((1, 2, 16, 16), np.float32)}
        items.append(item)
    seen = {}

    def net(*args, **kwargs):
        seen.update(kwargs)
        return model.unet(*args, **kwargs)

    out = branch_loss(net, model, cond, items, "motion", cfg, torch.Generator().manual_seed(0), torch.Generator())
    assert sorted(seen["conditions"]) == ["motion", "sketch"]  # every kind goes in, zeros where missing
    assert seen["condition_keep"].tolist() == [[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    assert out["conditions"] == {"sketch": 0.5, "motion": 0.0}
    out["loss"].backward()
    # the encoder takes part even where nothing is kept, so every rank reduces the same gradients under ZeRO
    assert all(p.grad is not None for p in model.unet.condition_encoder.parameters())


def test_generation_follows_the_given_conditions(small_model):
    from model.text_to_video import TextToVideo

    torch.manual_seed(0)
    cond_cfg = {"kinds": ["sketch", "motion"], "hidden": 16}
    overrides = {**small_model, "num_frames": 2, "height": 16, "width": 16, "unet.extra_in_channels": 8}
    model = TextToVideo.build(get_config("tiny", {**overrides, "unet.conditions": cond_cfg}))
    with torch.no_grad():  # a trained model: the UNet's and the encoder's zero-initialised layers have grown
        for p in model.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    sketch = torch.ones(1, 1, 1, 16, 16)  # one edge image for every frame and prompt
    args = dict(steps=2, seed=0)
    plain = model.generate(["a red square", "a blue circle"], **args)
    with_sketch = model.generate(["a red square", "a blue circle"], conditions={"sketch": sketch}, **args)
    again = model.generate(["a red square", "a blue circle"], conditions={"sketch": sketch}, **args)
    assert with_sketch.shape == plain.shape == (2, 2, 16, 16, 3)
    assert not np.array_equal(with_sketch, plain) and np.array_equal(with_sketch, again)
    with pytest.raises(ValueError, match="not among this model's conditions"):
        model.generate(["x"], conditions={"depth": torch.zeros(1, 1, 2, 16, 16)}, **args)
    # guidance can push towards the conditions too; without guidance there is nothing to contrast
    guided = model.generate(["a red square"], conditions={"sketch": sketch}, guide_conditions=True, **args)
    assert not np.array_equal(guided, with_sketch[:1])
    plain_args = dict(args, guidance=1.0)
    assert np.array_equal(
        model.generate(["a red square"], conditions={"sketch": sketch}, guide_conditions=True, **plain_args),
        model.generate(["a red square"], conditions={"sketch": sketch}, **plain_args),
    )
    # no condition given = every condition dropped, as training drops them (the encoder's learned bias included)
    dropped = model.unet.condition_input(
        None, {"sketch": torch.zeros(1, 1, 1, 16, 16)}, torch.zeros(1, 2), torch.zeros(1, 4, 2, 16, 16)
    )
    assert dropped.abs().sum() > 0
    assert torch.equal(model._condition_input({}, (1, 4, 2, 16, 16), torch.float32), dropped)


def test_condition_metrics_score_videos_that_follow_their_conditions():
    from pipelines.metrics import condition_metrics

    right = shapes.render_video("red", "square", "right", 48, 48, 8)
    left = shapes.render_video("red", "square", "left", 48, 48, 8)
    given = {"motion": motion_field(media.encode_mp4(right, 8.0), 8, 48, 48), "sketch": edge_map(right)}
    followed = condition_metrics([right], [given])
    assert followed["motion_agreement"] == 1.0 and followed["sketch_iou"] > 0.9  # the Sobel reach is taken off
    ignored = condition_metrics([left], [given])  # the other way, and elsewhere in most frames
    assert ignored["motion_agreement"] == 0.0 and ignored["sketch_iou"] < 0.5
    assert condition_metrics([right], [{}]) == {}


@pytest.fixture(scope="module")
def composer_checkpoint(tmp_path_factory):
    """A tiny model that takes motion and sketch conditions (16x16, 4 frames), saved as a checkpoint."""
    from model.text_to_video import TextToVideo

    torch.manual_seed(0)
    cond = {"kinds": ["motion", "sketch"], "hidden": 16}
    overrides = {"unet.model_channels": 8, "unet.num_groups": 4, "num_frames": 4, "height": 16, "width": 16}
    model = TextToVideo.build(get_config("tiny", {**overrides, "unet.extra_in_channels": 8, "unet.conditions": cond}))
    return model.save(tmp_path_factory.mktemp("composer") / "model.pt")


def test_t2v_sample_takes_any_subset_of_conditions_from_files(composer_checkpoint, tmp_path, capsys):
    from flows import sample

    video = shapes.render_video("red", "square", "right", 16, 16, 4)
    clip = media.write_mp4(video, tmp_path / "clip.mp4", 8.0)
    (tmp_path / "edges.png").write_bytes(media.encode_jpg(video[0]))
    base = ["--checkpoint", str(composer_checkpoint), "--prompt", "a red square", "--steps", "2"]
    out = tmp_path / "out.mp4"
    args = [
        *base,
        "--out",
        str(out),
        "--condition",
        f"motion={clip}",
        "--condition",
        f"sketch={tmp_path / 'edges.png'}",
    ]
    assert sample.main(args) == 0
    assert media.decode_video_file(out).shape == (4, 16, 16, 3)
    np.save(tmp_path / "sketch.npy", edge_map(video))
    assert (
        sample.main([*base, "--out", str(tmp_path / "b.mp4"), "--condition", f"sketch={tmp_path / 'sketch.npy'}"]) == 0
    )
    assert sample.main([*args[:-4], "--condition", f"sketch={tmp_path / 'sketch.npy'}", "--guide-conditions"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:
        sample.main([*base, "--out", str(out), "--guide-conditions"])
    assert usage.value.code == 2
    assert "--guide-conditions goes with --condition" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("condition", "words"),
    [
        ("sketch=wide.png", "an image of 32x16; expected 16x16"),
        ("motion=short.mp4", "2 frames of 16x16; the model makes 4 frames of 16x16"),
        ("motion=still.png", "motion comes from a video"),
        ("depth=still.png", "this model takes motion, sketch"),
        ("sketch=missing.png", "no such file"),
        ("sketch=flat.npy", "shape [4, 16, 16], expected [4 or 1, 1, 16, 16]"),
    ],
)
def test_a_condition_file_of_the_wrong_size_length_or_kind_is_a_usage_error(
    composer_checkpoint, tmp_path, capsys, condition, words
):
    from flows import sample

    video = shapes.render_video("red", "square", "right", 16, 16, 2)
    media.write_mp4(video, tmp_path / "short.mp4", 8.0)
    (tmp_path / "still.png").write_bytes(media.encode_jpg(video[0]))
    (tmp_path / "wide.png").write_bytes(media.encode_jpg(np.zeros((16, 32, 3), np.uint8)))
    np.save(tmp_path / "flat.npy", np.zeros((4, 16, 16), np.uint8))
    kind, name = condition.split("=")
    args = ["--checkpoint", str(composer_checkpoint), "--prompt", "x", "--out", str(tmp_path / "o.mp4")]
    assert sample.main([*args, "--condition", f"{kind}={tmp_path / name}"]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_conditions_need_a_model_that_takes_them(tiny_checkpoint, tmp_path, capsys):
    from flows import sample

    (tmp_path / "e.png").write_bytes(media.encode_jpg(np.zeros((32, 32, 3), np.uint8)))
    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path / "o.mp4")]
    assert sample.main([*args, "--condition", f"sketch={tmp_path / 'e.png'}"]) == 2
    assert "takes no structure conditions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main([*args, "--condition", "sketch"])
    assert "use KIND=PATH" in capsys.readouterr().err


def test_the_conditions_benchmark_scores_three_ways_of_generating(tmp_path):
    from flows.benchmarks import conditions as bench
    from model.text_to_video import TextToVideo

    refs = bench.references(4, 4.0)
    assert all("moving" not in r["prompt"] for r in refs) and all(r["direction"] for r in refs)  # no direction word
    assert refs[0]["motion"].shape == (bench.FRAMES, 2, bench.SIDE, bench.SIDE)
    torch.manual_seed(0)
    cfg = bench.ConditionsBenchConfig(samples=2, steps=1)
    overrides = {"unet.model_channels": 8, "unet.num_groups": 4, "num_frames": bench.FRAMES}
    mc = get_config("tiny", {**settings.to_dict(cfg.train)["model_overrides"], **overrides})
    path = TextToVideo.build(mc).save(tmp_path / "model.pt")
    rows = bench.evaluate(str(path), cfg)
    assert list(rows) == ["text only", "text + motion", "text + edge map"]
    assert all(0 <= r["direction_accuracy"] <= 1 and 0 <= r["sketch_iou"] <= 1 for r in rows.values())
    assert "edge-map IoU" in bench.render(rows, cfg, steps=10)
