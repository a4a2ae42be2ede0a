"""The whole curation run on real Ray Data (the session's local Ray), real ffmpeg and real tars:
accounting on a corpus with bad inputs, read-back with webdataset and Ray Data, re-runs, resumption after a
crash, incremental runs, the CLIP actor pool, re-ingesting shards, and the CLI."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys

import pytest
import webdataset as wds

from pipelines import media, schema, settings
from pipelines.curation import job as curate
from pipelines.curation.ledger import read_ledger

SETTINGS = [
    "clips.width=32",
    "clips.height=32",
    "clips.num_frames=8",
    "clips.fps=8",
    "quality.min_side=16",
    "progress=false",
]


def _cfg(*sets: str) -> curate.CurateConfig:
    return settings.load(curate.CurateConfig, None, [*SETTINGS, *sets])


@pytest.fixture(scope="module")
def corpus(shapes_corpus, make_bad_inputs, tmp_path_factory):
    """The shapes corpus plus every bad input (the stage tests' files), in one CSV manifest. Returns (manifest,
    expected) where expected maps each manifest row's file name to (status, stage, reason) in the ledger."""
    root = tmp_path_factory.mktemp("bad")
    expected_bad = make_bad_inputs(root)
    lines = shapes_corpus.read_bytes().splitlines()
    header, rows = lines[0], lines[1:]
    first_video = shapes_corpus.parent / "videos" / "s7_v00000.mp4"
    for name in ("bad_caption.mp4", "long_caption.mp4"):
        shutil.copy(first_video, root / name)
    shutil.copy(shapes_corpus.parent / "images" / "s7_i00001.jpg", root / "no_caption.jpg")
    extra = [f"{root / name},a caption for {name},,,,".encode() for name in expected_bad]
    extra += [
        f"{root / 'bad_caption.mp4'},".encode() + b"caf\xe9 au lait in latin-1,video,,,",  # non-UTF-8 caption
        f"{root / 'long_caption.mp4'},{'x' * 10_000},video,,,".encode(),  # 10,000 characters
        f"{root / 'no_caption.jpg'},,image,,,".encode(),  # image without caption
        rows[0],  # duplicate row
    ]
    manifest = root / "manifest.csv"
    manifest.write_bytes(b"\n".join([header, *rows, *extra]) + b"\n")
    expected = {name: ("rejected", stage, reason) for name, (stage, reason) in expected_bad.items()}
    expected.update(
        {
            "bad_caption.mp4": ("accepted", "write", ""),
            "long_caption.mp4": ("accepted", "write", ""),
            "no_caption.jpg": ("rejected", "caption", "caption_missing"),
        }
    )
    return manifest, expected, len(rows) + len(extra)


@pytest.fixture(scope="module")
def full_run(ray_session, corpus, tmp_path_factory):
    manifest, _, _ = corpus
    out = tmp_path_factory.mktemp("curated")
    summary = curate.run(_cfg(), str(manifest), str(out))
    return out, summary


def _shard_samples(out):
    urls = [u for kind in schema.KINDS for u in schema.shard_urls(out, kind)]
    return [schema.decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False)]


def _outcome(out, inputs=None):
    """What a run produced, independent of run ids and order: ledger rows and shard samples (of ``inputs``,
    a set of (source, occurrence), when given)."""
    rows = [r for r in read_ledger(out).to_pylist() if inputs is None or (r["source"], r["occurrence"]) in inputs]
    ledger = sorted(
        (r["source"], r["occurrence"], r["status"], r["stage"], r["reason"], tuple(sorted(r["keys"]))) for r in rows
    )
    keys = {k for r in rows for k in r["keys"]}
    samples = sorted((s.key, s.meta.kind, s.caption) for s in _shard_samples(out) if inputs is None or s.key in keys)
    return ledger, samples


def test_every_input_ends_accepted_or_rejected_with_its_reason(full_run, corpus):
    out, summary = full_run
    _, expected, n_rows = corpus
    ledger = read_ledger(out).to_pylist()
    # accepted + rejected = inputs, in the ledger and in the summary
    assert len(ledger) == n_rows == summary["inputs"] == summary["processed"]
    assert summary["accepted"] + summary["rejected"] == summary["inputs"]
    assert sum(r["status"] == "accepted" for r in ledger) == summary["accepted"]
    by_name = collections.defaultdict(list)
    for r in ledger:
        by_name[r["source"].rsplit("/", 1)[-1]].append(r)
    for name, (status, stage, reason) in expected.items():
        [row] = by_name[name]
        assert (row["status"], row["stage"], row["reason"]) == (status, stage, reason), name
        assert row["given"]
        if status == "rejected":
            assert row["detail"] and not row["keys"]
    # the duplicate row: same source, second occurrence, rejected; the first occurrence is curated
    dup = by_name["s7_v00000.mp4"]
    assert sorted((r["occurrence"], r["status"], r["reason"]) for r in dup) == [
        (0, "accepted", ""),
        (1, "rejected", "duplicate"),
    ]
    # the bad-caption videos became text-free, saying why
    samples = {s.key: s for s in _shard_samples(out)}
    for name, why in (("bad_caption.mp4", "caption_bad_encoding"), ("long_caption.mp4", "caption_too_long")):
        [row] = by_name[name]
        assert row["kinds"] == ["video", "video"]
        assert all(samples[k].meta.extra["text_free_reason"] == why and samples[k].caption is None for k in row["keys"])
    # summary: counts per stage and per reason agree with the ledger
    reasons = collections.Counter(f"{r['stage']}:{r['reason']}" for r in ledger if r["status"] == "rejected")
    assert summary["rejected_by_reason"] == dict(reasons)
    assert summary["stages"]["probe"]["rejected"] == 4 and summary["stages"]["quality"]["rejected"] == 2
    assert summary["samples"] == {k: sum(k == kind for r in ledger for kind in r["kinds"]) for k in schema.KINDS}
    assert summary["totals"]["inputs"] == n_rows and summary["throughput"]["samples_per_s"] > 0
    assert json.loads((out / schema.SUMMARY_FILE).read_text())["run"] == summary["run"]


def test_shards_read_back_with_webdataset(full_run):
    out, summary = full_run
    ledger_keys = {k for r in read_ledger(out).to_pylist() for k in r["keys"]}
    samples = _shard_samples(out)
    assert sorted(s.key for s in samples) == sorted(ledger_keys)  # every key once, nothing else
    assert {k: sum(s.meta.kind == k for s in samples) for k in schema.KINDS} == summary["samples"]
    for s in samples:
        m = s.meta
        assert s.key == schema.sample_key(m.source, m.clip_index)
        assert (m.width, m.height) == (32, 32)
        if m.kind == "image":
            assert media.decode_image(s.media).shape == (32, 32, 3) and m.num_frames == 1 and s.caption
        else:
            assert media.decode_mp4(s.media).shape == (8, 32, 32, 3)
            assert (m.num_frames, m.fps) == (8, 8.0) and 0 < m.scores["motion"] < 0.2
            assert (s.caption is not None) == (m.kind == "video_text")
        assert s.caption == m.caption
        if m.labels.get("colour") and s.caption:  # ground truth from the shapes manifest travels along
            assert m.labels["colour"] in s.caption
    # the per-shard parquet index lists exactly its tar's samples
    import pyarrow.parquet as pq

    for kind in schema.KINDS:
        for url in schema.shard_urls(out, kind):
            index_keys = pq.read_table(schema.index_path(url)).column("key").to_pylist()
            assert index_keys == [s["__key__"] for s in wds.WebDataset([url], shardshuffle=False)]


def test_shards_read_back_with_ray_data(full_run):
    import ray

    out, _ = full_run
    urls = [u for kind in schema.KINDS for u in schema.shard_urls(out, kind)]
    expected = {s.key: s for s in _shard_samples(out)}
    raw = ray.data.read_webdataset(urls, decoder=None).take_all()  # members as bytes, exactly as written
    assert sorted(r["__key__"] for r in raw) == sorted(expected)
    for r in raw:
        s = schema.decode_sample(r)
        want = expected[s.key]
        assert (s.media, s.caption, s.meta) == (want.media, want.caption, want.meta)
    decoded = ray.data.read_webdataset(urls).take_all()  # Ray's default decoders: json -> dict, txt -> str
    for r in decoded:
        want = expected[r["__key__"]]
        assert schema.SampleMeta.from_json(r["json"]) == want.meta and r.get("txt") == want.caption


def test_running_again_skips_finished_work(full_run, corpus):
    out, first = full_run
    manifest, _, n_rows = corpus
    before = _outcome(out)
    tars = sorted(p.name for p in (out / "shards").rglob("*.tar"))
    again = curate.run(_cfg(), str(manifest), str(out))
    assert (again["inputs"], again["skipped_done"], again["processed"]) == (n_rows, n_rows, 0)
    assert _outcome(out) == before and sorted(p.name for p in (out / "shards").rglob("*.tar")) == tars


def test_a_killed_run_resumes_to_the_uninterrupted_result(full_run, corpus, tmp_path, monkeypatch):
    manifest, _, _ = corpus
    out = tmp_path / "resumed"
    # tars of 2 samples, a ledger part every 3 inputs; an accepted input is committed once its tar is closed
    cfg = _cfg("shards.commit_every=3", "shards.maxcount=2", "inputs.max_inputs=12")
    monkeypatch.setenv(curate.CRASH_ENV, "7")  # die after 7 inputs were written, before their commit
    with pytest.raises(curate.SimulatedCrash):
        curate.run(cfg, str(manifest), str(out))
    monkeypatch.delenv(curate.CRASH_ENV)
    ledger = read_ledger(out).to_pylist()
    committed = len(ledger)
    assert 0 < committed < 7
    assert all(schema.index_path(out / tar).exists() for r in ledger for tar in r["shards"])  # none names a lost tar
    unindexed = [t for t in (out / "shards").rglob("*.tar") if not schema.index_path(t).exists()]
    summary = curate.run(cfg, str(manifest), str(out))
    assert summary["removed_partial_shards"] >= len(unindexed) and summary["skipped_done"] == committed
    assert summary["totals"]["inputs"] == 12
    # same keys, same counts, same reasons as the uninterrupted run had for these inputs
    done = {(r["source"], r["occurrence"]) for r in read_ledger(out).to_pylist()}
    assert _outcome(out) == _outcome(full_run[0], done)


def test_incremental_runs_add_only_new_inputs(ray_session, shapes_corpus, full_run, tmp_path):
    out = tmp_path / "incremental"
    first = curate.run(_cfg("inputs.max_inputs=5"), str(shapes_corpus), str(out))
    second = curate.run(_cfg(), str(shapes_corpus), str(out))
    assert first["processed"] == 5 and second["skipped_done"] == 5
    assert second["processed"] == second["inputs"] - 5
    ledger, samples = _outcome(out)
    full_ledger, full_samples = _outcome(full_run[0])
    assert set(samples) <= set(full_samples) and len(samples) == len({k for k, _, _ in samples})
    assert len(ledger) == second["inputs"] == second["totals"]["inputs"]


def test_model_stages_run_as_actor_pools(ray_session, shapes_corpus, tmp_path):
    # CLIP caption filter + pre-encoding in one run (two actor pools sharing the 2 test CPUs with the tasks).
    # The tiny OpenCLIP has random weights (no pretrained weights exist here): its scores are arbitrary but
    # deterministic; what is tested is that they are computed, stored, and that the threshold routes samples.
    threshold = 0.05
    with pytest.raises(settings.ConfigError, match="clips.num_frames=8 clips.width=32 clips.height=32"):
        curate.run(
            _cfg("encode.mode=latents+clip", "clips.width=64", "clips.height=64"),
            str(shapes_corpus),
            str(tmp_path / "wrong-size"),
        )
    cfg = _cfg(
        "caption.filter=clip",
        "caption.model=t2v-tiny-clip",
        f"caption.threshold={threshold}",
        "caption.batch_size=8",
        "caption.actor_cpus=0.5",
        "encode.mode=latents+clip",
        "encode.actor_cpus=0.5",
        "inputs.max_inputs=10",
    )
    out = tmp_path / "models"
    summary = curate.run(cfg, str(shapes_corpus), str(out))
    assert summary["accepted"] + summary["rejected"] == summary["inputs"] == 10
    samples = _shard_samples(out)
    kinds = collections.Counter(s.meta.kind for s in samples)
    assert kinds["video_text"] + kinds["image"] > 0 and len(samples) == sum(summary["samples"].values())
    for s in samples:
        if s.meta.kind in ("video_text", "image"):
            assert s.meta.scores["clip_sim"] >= threshold
        elif s.meta.extra["text_free_reason"] == "caption_low_similarity":
            assert s.meta.scores["clip_sim"] < threshold and s.meta.extra["unused_caption"]
        # pre-encoded members travel with every sample
        assert s.arrays["latent_mean"].shape == (3, s.meta.num_frames, 32, 32)
        assert ("text_emb" in s.arrays) == (s.meta.kind != "video") and s.encoders["clip_model"] == "t2v-tiny-clip"
    assert len({json.dumps(s.encoders, sort_keys=True) for s in samples}) == 1
    low = [r for r in read_ledger(out).to_pylist() if r["reason"] == "caption_low_similarity"]
    assert all(r["media_type"] == "image" and r["status"] == "rejected" for r in low)


def test_shards_can_be_reingested(full_run, tmp_path):
    src, _ = full_run
    out = tmp_path / "again"
    # a curation output directory as --input: its finished shards, each sample read in place from its tar
    summary = curate.run(_cfg("inputs.max_inputs=10"), str(src), str(out))
    assert (summary["accepted"], summary["rejected"]) == (10, 0)
    original = {s.key: s for s in _shard_samples(src)}
    for s in _shard_samples(out):
        tar, member = s.meta.source.split("#")
        before = original[member.split(".")[0]]
        assert tar.startswith(str(src / "shards")) and s.meta.kind == before.meta.kind
        assert s.caption == before.caption and s.meta.num_frames == before.meta.num_frames


def test_cli_prints_config_summary_and_refuses_mixed_settings(full_run, corpus, capsys):
    out, _ = full_run
    manifest, _, n_rows = corpus
    args = ["--input", str(manifest), "--output", str(out)] + [a for s in SETTINGS for a in ("--set", s)]
    assert curate.main(args) == 0  # nothing new: no Ray work, prints the summary table
    printed = capsys.readouterr().out
    assert f"({n_rows} already done, 0 processed)" in printed and "output totals" in printed
    assert curate.main(args + ["--set", "clips.width=64"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert curate.main(["--dry-run", "--set", "clips.width=48"]) == 0
    assert settings.load(curate.CurateConfig, None, []).clips.width == 256
    assert "width: 48" in capsys.readouterr().out
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.curation.job", "--dry-run", "--set", "caption.threshold=0.3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "threshold: 0.3" in proc.stdout
