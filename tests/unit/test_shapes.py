"""The generated corpus is deterministic, real media, labelled truthfully, and the detector reads it back."""

import csv

import numpy as np
import pytest

from pipelines import media, shapes


def read_manifest(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_corpus_files_are_real_media_with_truthful_labels(shapes_corpus):
    rows = read_manifest(shapes_corpus)
    videos = [r for r in rows if r["kind"] == "video"]
    images = [r for r in rows if r["kind"] == "image"]
    assert len(videos) == 8 and len(images) == 6
    assert sum(1 for r in videos if r["caption"] == "") == 2  # text_free_fraction 0.25 of 8
    for r in videos:
        info = media.probe(r["path"])
        stream = info["streams"][0]
        assert stream["codec_name"] == "h264" and (stream["width"], stream["height"]) == (32, 32)
        frames = media.decode_video_file(r["path"])
        assert frames.shape == (24, 32, 32, 3)  # 2 s at 12 fps
        found = shapes.detect(frames)
        assert (found.colour, found.direction) == (r["colour"], r["direction"]), r
        if r["caption"]:
            assert r["caption"] == f"a {r['colour']} {r['shape']} moving {r['direction']}"
    for r in images:
        image = media.decode_image(open(r["path"], "rb").read())
        assert shapes.detect(image).colour == r["colour"]
        assert r["caption"] == f"a {r['colour']} {r['shape']}"
    combos = {(r["colour"], r["shape"], r["direction"]) for r in videos}
    assert not combos & set(shapes.HELDOUT), "held-out combinations must not appear in the corpus"


def test_generation_is_deterministic(tmp_path):
    cfg = shapes.CorpusConfig(num_videos=3, num_images=2, width=32, height=32, seconds=1.0, seed=3)
    a = shapes.generate(cfg, tmp_path / "a", progress=False)
    b = shapes.generate(cfg, tmp_path / "b", progress=False)
    rows_a, rows_b = read_manifest(a), read_manifest(b)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "path"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert open(ra["path"], "rb").read() == open(rb["path"], "rb").read()
    other = shapes.generate(
        shapes.CorpusConfig(num_videos=3, num_images=2, width=32, height=32, seconds=1.0, seed=4),
        tmp_path / "c",
        progress=False,
    )
    assert strip(read_manifest(other)) != strip(rows_a)


def test_motionless_captions_leave_the_direction_out_and_nothing_else_changes(tmp_path):
    base = dict(num_videos=12, num_images=0, width=16, height=16, seconds=0.5, fps=4.0, text_free_fraction=0.25)
    plain = read_manifest(shapes.generate(shapes.CorpusConfig(**base), tmp_path / "a", progress=False))
    vague = read_manifest(
        shapes.generate(shapes.CorpusConfig(**base, motionless_caption_fraction=0.5), tmp_path / "b", progress=False)
    )
    changed = [(p, v) for p, v in zip(plain, vague) if p["caption"] != v["caption"]]
    assert 2 <= len(changed) <= 8  # about half of the 9 captioned videos
    for p, v in changed:
        assert p["caption"] == f"{v['caption']} moving {p['direction']}" and v["direction"] == p["direction"]
    assert [r["caption"] == "" for r in plain] == [r["caption"] == "" for r in vague]  # the same text-free videos


@pytest.mark.parametrize("direction", shapes.DIRECTIONS)
def test_detector_reads_direction_and_colour_from_rendered_frames(direction):
    frames = shapes.render_video("green", "triangle", direction, 48, 40, 8)
    found = shapes.detect(frames)
    assert found.colour == "green" and found.direction == direction


def test_detector_reports_no_motion_and_no_shape():
    still = np.repeat(shapes.render_image("blue", "square", 32, 32)[None], 6, axis=0)
    assert shapes.detect(still).direction is None and shapes.detect(still).colour == "blue"
    empty = np.full((4, 16, 16, 3), 24, np.uint8)
    assert shapes.detect(empty).colour is None


def test_bad_config_values_are_rejected_with_the_key_named(tmp_path, capsys):
    for setting, message in (("text_free_fraction=2", "text_free_fraction"), ("num_vidoes=3", "unknown setting")):
        with pytest.raises(SystemExit) as exit_:  # a usage error, not a traceback
            shapes.main(["--output", str(tmp_path), "--set", setting])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_heldout_prompts_cycle_over_heldout_combinations():
    prompts = shapes.heldout_prompts(10)
    assert len(prompts) == 10
    assert all((c, s, d) in shapes.HELDOUT and p == shapes.caption_for(c, s, d) for p, c, s, d in prompts)
    # evaluation covers every colour and every direction; training keeps every colour, shape and direction
    assert {c for c, _, _ in shapes.HELDOUT} == set(shapes.COLOURS)
    assert {d for _, _, d in shapes.HELDOUT} == set(shapes.DIRECTIONS)
    seen = [combo for combo in shapes.ALL_COMBOS if combo not in shapes.HELDOUT]
    for axis, values in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.DIRECTIONS)):
        assert {combo[axis] for combo in seen} == set(values)
