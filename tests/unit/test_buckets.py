"""Clip shapes: buckets chosen by aspect in curation, one-bucket batches in the loader (weights, per-rank frame
lengths, exact resume, a split that starves no bucket), the model at every bucket's shape, fps conditioning.
Curation runs its real stages in-process (real ffmpeg) on generated videos of four aspects and two lengths."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from model.registry import get_config
from model.unet import UNet3D
from pipelines import buckets, loader, media, schema, settings, shapes
from pipelines.curation.config import CurateConfig
from pipelines.curation.stages import new_row
from pipelines.curation.stages.decode import ClipDecoder
from pipelines.curation.stages.probe import Probe
from pipelines.curation.stages.quality import InputQuality


def _samples(root: Path) -> list[schema.Sample]:
    urls = [u for kind in schema.KINDS for u in schema.shard_urls(root, kind)]
    return [schema.decode_sample(raw) for raw in wds.WebDataset(urls, shardshuffle=False)]


def _spec(root: Path, **kw) -> loader.LoaderSpec:
    base = dict(
        data=[str(root)],
        image_batch=2,
        video_batch=2,
        num_frames=4,
        height=16,
        width=16,
        shapes="buckets",
        size_multiple=4,
        prefetch=1,
        decode_workers=1,
    )
    return loader.LoaderSpec(**{**base, **kw})


def _take(spec: loader.LoaderSpec, n: int, rank: int = 0, world_size: int = 1, state=None) -> list[loader.StepBatch]:
    data = loader.TrainLoader(spec, rank, world_size, state=state)
    try:
        return [next(data) for _ in range(n)]
    finally:
        data.close()


# ---------------------------------------------------------------------------------------------------------------
# choosing a bucket, the config, the schema


def test_a_source_goes_to_the_bucket_nearest_its_aspect_and_bad_sources_say_why():
    sizes = buckets.parse_buckets(["256x256", "448x256", "256x448", "320x240"], "clips.buckets")
    assert buckets.choose_bucket(1920, 1080, sizes, False, 0.5).size == (448, 256)  # 16:9 -> 7:4, 1.6% crop
    assert buckets.choose_bucket(1080, 1920, sizes, False, 0.5).size == (256, 448)
    assert buckets.choose_bucket(640, 480, sizes, False, 0.5).size == (320, 240)  # 4:3: no crop
    assert buckets.choose_bucket(500, 500, sizes, False, 0.5).crop == 0.0
    # a 16:9 source too small for 448x256 but not for 320x240 takes the bucket it can fill
    assert buckets.choose_bucket(400, 240, sizes, False, 0.5).size == (320, 240)
    with pytest.raises(buckets.Rejected, match="smaller than every bucket .* clips.small_source=upscale") as e:
        buckets.choose_bucket(200, 120, sizes, False, 0.5)
    assert e.value.reason == "too_small"
    assert buckets.choose_bucket(200, 120, sizes, True, 0.5) == buckets.Choice(
        (448, 256), pytest.approx(0.0476, abs=1e-3), True
    )
    with pytest.raises(buckets.Rejected, match=r"aspect 8.00\).* crop 78% .*clips.max_crop=0.5") as e:
        buckets.choose_bucket(2048, 256, sizes, False, 0.5)
    assert e.value.reason == "bad_aspect"


@pytest.mark.parametrize("bad", ["[wide]", "[448x256, 448]", "[447x256]", "[8x8]", "[256x256, 256x256]", "[]"])
def test_an_unknown_bucket_in_the_config_is_a_usage_error_naming_the_form(bad):
    with pytest.raises(settings.ConfigError, match=r"clips.buckets.*(WxH|more than once)"):
        settings.load(CurateConfig, None, [f"clips.buckets={bad}"])


def test_the_single_size_default_is_one_bucket_that_upscales_as_before():
    clips = settings.load(CurateConfig, None, ["clips.width=16", "clips.height=16", "clips.num_frames=6"]).clips
    assert (clips.video_sizes, clips.image_sizes, clips.clip_lengths) == ([(16, 16)], [(16, 16)], [6])
    assert clips.upscale and clips.crop_limit is None  # how curation has always treated one size
    bucketed = settings.load(CurateConfig, None, ["clips.buckets=[32x16,16x16]", "clips.lengths=[4,8]"]).clips
    assert not bucketed.upscale and bucketed.crop_limit == 0.5 and bucketed.clip_lengths == [4, 8]


def test_pre_encoding_refuses_a_bucket_the_model_cannot_take_before_any_work():
    from pipelines.curation import job

    sets = ["encode.mode=latents+clip", "encode.model=tiny"]
    job._check_encode(settings.load(CurateConfig, None, ["clips.buckets=[32x16,16x32]", *sets]))  # both fit
    bad = settings.load(CurateConfig, None, ["clips.buckets=[32x16,24x18]", *sets])
    with pytest.raises(settings.ConfigError, match=r"multiples of 4 pixels; bucket\(s\) 24x18 are not"):
        job._check_encode(bad)


def test_the_main_job_curates_one_bucket_of_one_length_and_trains_at_the_model_shape(tmp_path, capsys):
    import yaml

    from flows import demo

    assert demo.main(["--state-dir", str(tmp_path / "d"), "--dry-run"]) == 0
    flow = yaml.safe_load(capsys.readouterr().out)["flow"]
    clips = settings.from_dict(CurateConfig, flow["curate"]).clips
    assert (clips.video_sizes, clips.image_sizes, clips.clip_lengths) == ([(16, 16)], [(16, 16)], [6])
    assert flow["train"]["shapes"] == "model"


def test_shards_of_the_previous_format_read_with_the_bucket_of_their_size():
    old = {"source": "a.mp4", "kind": "video", "num_frames": 16, "fps": 8.0, "width": 448, "height": 256}
    meta = schema.SampleMeta.from_json(json.dumps(old))
    assert (meta.bucket, meta.frames, meta.fps, meta.shape) == ("448x256", 16, 8.0, "448x256_16f")
    again = schema.SampleMeta.from_json(meta.to_json())
    assert again == meta and json.loads(meta.to_json())["bucket"] == "448x256"
    with pytest.raises(ValueError, match="bucket='256x256' but the clip is 448x256"):
        schema.SampleMeta(**old, bucket="256x256")


# ---------------------------------------------------------------------------------------------------------------
# curation


def test_every_clip_lands_in_its_bucket_at_every_length(aspect_corpus, bucket_shards):
    expected = {row["path"]: row["bucket"] for row in csv.DictReader(open(aspect_corpus, encoding="utf-8"))}
    samples = _samples(bucket_shards)
    lengths: dict[str, set[int]] = {}
    for s in samples:
        assert s.meta.bucket == expected[s.meta.source], s.meta.source
        w, h = buckets.parse_size(s.meta.bucket, "bucket")
        pixels = media.decode_image(s.media)[None] if s.meta.kind == "image" else media.decode_mp4(s.media)
        assert pixels.shape == (s.meta.frames, h, w, 3)
        assert 0 <= s.meta.extra["crop_fraction"] < 0.2
        lengths.setdefault(s.meta.source, set()).add(s.meta.frames)
    videos = [p for p in expected if p.endswith(".mp4")]
    assert len(videos) == 8 and all(lengths[p] == {4, 8} for p in videos)  # 8 and 16 source frames: both lengths
    assert {s.meta.bucket for s in samples if s.meta.kind == "image"} == set(expected.values())
    assert len({s.key for s in samples}) == len(samples)  # lengths never collide on a key


def _decode(cfg, path):
    row = new_row(source=str(path), given=str(path), origin="dir", uri=str(path), caption=None)
    table = [row]
    for stage in (Probe(cfg), InputQuality(cfg), ClipDecoder(cfg)):
        table = stage(table)
    return table.to_pylist()


def test_sources_smaller_than_every_bucket_or_of_absurd_aspect_are_rejected_with_the_reason(tmp_path):
    base = ["clips.buckets=[32x16,24x16]", "clips.num_frames=4", "clips.fps=8", "quality.min_side=8"]
    small = media.write_mp4(shapes.render_video("red", "square", "right", 20, 14, 8), tmp_path / "small.mp4", 8)
    thin = media.write_mp4(shapes.render_video("red", "square", "right", 160, 16, 8), tmp_path / "thin.mp4", 8)
    [rejected] = _decode(settings.load(CurateConfig, None, base), small)
    assert (rejected["status"], rejected["stage"], rejected["reason"]) == ("rejected", "decode", "too_small")
    assert "20x14 is smaller than every bucket (32x16, 24x16)" in rejected["detail"]
    upscaled = _decode(settings.load(CurateConfig, None, [*base, "clips.small_source=upscale"]), small)
    assert {r["status"] for r in upscaled} == {"ok"} and upscaled[0]["width"] == 24  # 20x14 is nearest 3:2
    assert json.loads(upscaled[0]["extra"])["upscaled"] is True
    [absurd] = _decode(settings.load(CurateConfig, None, base), thin)
    assert absurd["reason"] == "bad_aspect" and "aspect 10.00" in absurd["detail"]


def test_a_phone_video_goes_to_the_bucket_of_the_aspect_it_is_shown_at(tmp_path):
    import subprocess

    wide = media.write_mp4(shapes.render_video("red", "square", "right", 64, 32, 8), tmp_path / "wide.mp4", 8)
    rotated = tmp_path / "rotated.mp4"  # stored 64x32, shown 32x64 (the display matrix phones write)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(wide), "-c", "copy"]
        + ["-metadata:s:v:0", "rotate=90", str(rotated)],
        check=True,
    )
    cfg = settings.load(CurateConfig, None, ["clips.buckets=[32x16,16x32]", "clips.num_frames=4", "clips.fps=8"])
    cfg = dataclasses.replace(cfg, quality=dataclasses.replace(cfg.quality, min_side=16))
    assert {(r["width"], r["height"]) for r in _decode(cfg, wide)} == {(32, 16)}
    clips = _decode(cfg, rotated)
    assert {(r["width"], r["height"]) for r in clips} == {(16, 32)}
    assert (
        media.decode_mp4(clips[0]["media"]).shape == (4, 32, 16, 3)
        and json.loads(clips[0]["extra"])["crop_fraction"] == 0
    )


# ---------------------------------------------------------------------------------------------------------------
# the loader


def test_batches_hold_one_bucket_each_sized_by_the_pixel_budget(bucket_shards):
    batches = _take(_spec(bucket_shards), 12)
    seen = Counter()
    for b in batches:
        for items, budget in ((b.image, 2 * 16 * 16), (b.video, 2 * 16 * 16 * 4)):
            assert len({it.shape for it in items}) == 1  # one bucket per batch, no padding
            stacked = loader.collate_frames(items)  # stacks only when every clip has the same shape
            w, h, f = (int(v) for v in items[0].shape.replace("f", "").replace("_", "x").split("x"))
            assert stacked.shape == (len(items), f, h, w, 3)
            assert len(items) == max(1, budget // (w * h * f))
            seen[items[0].shape] += 1
    assert len(seen) >= 5  # several buckets and lengths within a dozen steps
    assert {b.video[0].kind for b in batches} == {"video", "video_text"}


def test_a_resumed_loader_continues_exactly_with_buckets(bucket_shards, caplog):
    spec = _spec(bucket_shards)
    full = _take(spec, 8)
    resumed = _take(spec, 4, state=json.loads(json.dumps(full[3].position)))  # as a checkpoint stores it

    def keys(batches):
        return [[(it.key, it.shape) for it in b.image + b.video] for b in batches]

    assert keys(resumed) == keys(full[4:])
    for a, b in zip(resumed, full[4:]):
        np.testing.assert_array_equal(loader.collate_frames(a.video), loader.collate_frames(b.video))
    assert resumed[-1].position["seen"] == full[-1].position["seen"]  # the histogram carries over
    # a position of the other mode cannot be continued: said, and the streams start over
    with caplog.at_level("WARNING", logger="pipelines.loader"):
        model_mode = dataclasses.replace(spec, shapes="model")
        assert keys(_take(model_mode, 2, state=full[3].position)) == keys(_take(model_mode, 2))
    assert "position is of shapes=buckets" in caplog.text


def test_bucket_weights_choose_buckets_and_per_rank_mixing_gives_each_rank_its_frames(bucket_shards):
    only_wide = _take(_spec(bucket_shards, bucket_weights={"32x16": 1.0}), 5)
    assert {it.shape for b in only_wide for it in b.image + b.video} <= {"32x16_1f", "32x16_4f", "32x16_8f"}
    per_rank = _spec(bucket_shards, frame_mixing="per_rank", frame_lens=[4, 8])
    frames = [{it.frames.shape[0] for b in _take(per_rank, 4, rank, 2) for it in b.video} for rank in range(2)]
    assert frames == [{4}, {8}]  # VGen's frame_lens: rank 0 on 4 frames, rank 1 on 8
    with pytest.raises(loader.DataError, match=r"bucket_weights names \['40x40'\].*32x16_4f"):
        loader.TrainLoader(_spec(bucket_shards, bucket_weights={"40x40": 1.0}))


def test_the_worker_split_starves_no_bucket(bucket_shards):
    # 24x16 clips of 8 frames: one captioned sample, fewer than the 3 ranks; every rank still gets one
    inventory = loader.bucket_inventory(loader.find_shard_sets([str(bucket_shards)]))
    for kind, by_shape in inventory.items():
        for shape, (urls, counts, members) in by_shape.items():
            for rank in range(3):
                stream = loader.KindStream(kind, urls, counts, rank, 3, seed=0, shape=shape, members=members)
                raw, _ = next(iter(stream))
                assert schema.decode_sample(raw).meta.shape == shape, (kind, shape, rank)


def test_a_bucket_the_unet_cannot_take_is_named(bucket_shards):
    with pytest.raises(loader.DataError, match=r"bucket\(s\) 24x16_1f, 24x16_4f, 24x16_8f: .* multiples of 16"):
        loader.TrainLoader(_spec(bucket_shards, size_multiple=16))


# ---------------------------------------------------------------------------------------------------------------
# the model at every bucket's shape, fps conditioning


@pytest.mark.parametrize("f,h,w", [(4, 16, 32), (8, 32, 16), (4, 16, 24), (1, 16, 16)])
def test_the_unet_runs_at_every_bucket_shape(f, h, w, small_model):
    torch.manual_seed(0)
    unet = UNet3D(get_config("tiny", small_model).unet).eval()
    x = torch.randn(1, 3, f, h, w)
    with torch.no_grad():
        assert unet(x, torch.tensor([10]), context=torch.zeros(1, 77, 32)).shape == x.shape


def test_fps_conditioning_starts_as_a_no_op_and_then_tells_frame_rates_apart(small_model):
    cfg = get_config("tiny", small_model).unet
    torch.manual_seed(0)
    plain = UNet3D(cfg).eval()
    with_fps = UNet3D(dataclasses.replace(cfg, use_fps_condition=True)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere, so the zero-initialised output layer passes something on
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    missing = with_fps.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("fps_embedding.") for k in missing)  # the fps MLP is all that is new
    x, t = torch.randn(2, 3, 4, 16, 16), torch.tensor([5, 500])
    with torch.no_grad():
        torch.testing.assert_close(with_fps(x, t, fps=torch.tensor([4.0, 8.0])), plain(x, t))
        torch.nn.init.normal_(with_fps.fps_embedding[-1].weight, std=0.1)
        assert not torch.allclose(with_fps(x, t, fps=4.0), with_fps(x, t, fps=16.0))
    with pytest.raises(ValueError, match="fps-conditioned"):
        with_fps(x, t)
    with pytest.raises(ValueError, match="use_fps_condition is off"):
        plain(x, t, fps=8.0)
    for name in ("modelscope-1.7b", "tf-t2v"):  # the released layouts have no fps embedding
        assert not get_config(name).unet.use_fps_condition
