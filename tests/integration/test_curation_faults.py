"""Curation under real faults, on the session's local Ray: a worker process that really dies (SIGKILL) and one
that really hangs, an object store that really is unreachable, then a real second run over the same output."""

from __future__ import annotations

import shutil

from pipelines import settings
from pipelines.curation import job as curate
from pipelines.curation.ledger import read_ledger
from pipelines.curation.stages import HANG_ENV, KILL_ENV

SETTINGS = [
    "clips.width=32",
    "clips.height=32",
    "clips.num_frames=8",
    "clips.fps=8",
    "quality.min_side=16",
    "progress=false",
    "caption.filter=text",
    "inputs_per_task=2",  # poison inputs share their tasks with good ones
    "task_retries=1",
    "transient_retries=0",  # the unreachable store costs ~6 s per try (the S3 client's own retries)
]


def _manifest(tmp_path, rows):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(["path,caption", *(f"{r},a red circle moving up" for r in rows)]) + "\n")
    return manifest


def test_poison_inputs_are_rejected_with_a_reason_and_the_run_goes_on(
    ray_session, shapes_corpus, tmp_path, monkeypatch
):
    videos = shapes_corpus.parent / "videos"
    for name, src in [("a.mp4", "s7_v00000.mp4"), ("b.mp4", "s7_v00001.mp4"), ("kill.mp4", "s7_v00002.mp4")]:
        shutil.copy(videos / src, tmp_path / name)
    shutil.copy(videos / "s7_v00003.mp4", tmp_path / "hang.mp4")
    manifest = _manifest(tmp_path, [tmp_path / n for n in ("a.mp4", "kill.mp4", "hang.mp4", "b.mp4")])
    monkeypatch.setenv(KILL_ENV, "kill.mp4")  # the probe SIGKILLs its own worker on this file
    monkeypatch.setenv(HANG_ENV, "hang.mp4")  # ... and sleeps for ever on this one
    cfg = settings.load(curate.CurateConfig, None, [*SETTINGS, "input_limit_s=5", "task_retries=0"])
    out = tmp_path / "out"

    summary = curate.run(cfg, str(manifest), out)

    ledger = {r["given"].rsplit("/", 1)[-1]: r for r in read_ledger(out).to_pylist()}
    assert {n: (r["status"], r["stage"], r["reason"]) for n, r in ledger.items()} == {
        "a.mp4": ("accepted", "write", ""),
        "b.mp4": ("accepted", "write", ""),
        "kill.mp4": ("rejected", "decode", "worker_crash"),
        "hang.mp4": ("rejected", "decode", "time_limit"),
    }
    assert summary["accepted"] == 2 and summary["rejected"] == 2

    # a second run: the poison inputs are in the ledger, so no run meets them again
    again = curate.run(cfg, str(manifest), out)
    assert again["skipped_done"] == 4 and again["processed"] == 0


def test_transient_faults_are_never_final_and_the_next_run_retries_them(
    ray_session, shapes_corpus, free_port, tmp_path, monkeypatch
):
    video = shapes_corpus.parent / "videos" / "s7_v00000.mp4"
    unreachable = f"s3://bucket/gone.mp4?endpoint_override=127.0.0.1:{free_port()}&scheme=http&region=us-east-1"
    manifest = _manifest(tmp_path, [video, unreachable])
    for key, value in {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    cfg = settings.load(curate.CurateConfig, None, SETTINGS)
    out = tmp_path / "out"

    summary = curate.run(cfg, str(manifest), out)
    # the unreachable store is not the input's fault: no ledger row, and shown apart from rejections
    assert summary["transient"] == 1 and summary["transient_by_reason"] == {"probe:fetch_failed": 1}
    assert (summary["accepted"], summary["rejected"]) == (1, 0)
    assert "transient" in curate.format_summary(summary)
    assert read_ledger(out).column("given").to_pylist() == [str(video)]

    again = curate.run(cfg, str(manifest), out)
    assert again["skipped_done"] == 1 and again["transient"] == 1  # tried again
    assert read_ledger(out).num_rows == 1
