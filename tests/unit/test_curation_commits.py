"""The curation driver's commits without Ray: tars are sized by sample count, not by ledger commits, and a ledger
row never names a tar that a crash can lose."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipelines import schema, settings
from pipelines.curation import job as curate
from pipelines.curation.ledger import Ledger, read_ledger, remove_uncommitted, summarize, summarize_ledger
from pipelines.curation.stages import new_row


def _rows(i: int, kinds: list[str | None]) -> list[dict]:
    """The rows the driver receives for input i: one per clip, of these kinds (None: a clip that was rejected)."""
    source = f"/data/v{i}.mp4"
    rows = []
    for clip, kind in enumerate(kinds):
        row = new_row(
            source=source,
            given=f"v{i}.mp4",
            uri="x",
            media_type="video",
            key=schema.sample_key(source, clip),
            clip_index=clip,
            caption=f"caption {i}",
            num_frames=4,
            fps=8.0,
            width=32,
            height=32,
            media=b"\x00\x00\x00\x18ftypmp42" + bytes([i % 256]) * 100,
            input_rows=len(kinds),
        )
        if kind is None:
            row.update(status="rejected", stage="quality", reason="static", detail="no motion")
        else:
            row["kind"] = kind
        rows.append(row)
    return rows


def _driver(out, *sets):
    cfg = settings.load(curate.CurateConfig, None, ["progress=false", *sets])
    return curate._Driver(out, "rtest", Ledger(out), cfg, total=0)


def _committed_tars_are_whole(out) -> None:
    """Every tar a ledger row names is indexed, holds what its index says, and the row's tars hold its keys."""
    indexed: dict[str, set] = {}
    for r in read_ledger(out).to_pylist():
        for tar in r["shards"]:
            if tar not in indexed:
                indexed[tar] = set(pq.read_table(schema.index_path(out / tar)).column("key").to_pylist())
                samples = {s["__key__"] for s in wds.WebDataset(str(out / tar), shardshuffle=False)}
                assert samples == indexed[tar], tar
        assert set(r["keys"]) <= set().union(*(indexed[t] for t in r["shards"])), r["source"]


# inputs of one clip, of two kinds (one clip captioned, one text-free), and rejected ones
INPUTS = [["video_text"]] * 5 + [["video_text", "video"], [None], ["video"], [None, None]] + [["video_text"]] * 6


def test_tars_are_sized_by_count_while_the_ledger_commits_every_input(tmp_path):
    driver = _driver(tmp_path, "shards.commit_every=1", "shards.maxcount=3")
    for i, kinds in enumerate(INPUTS):
        driver.receive(_rows(i, kinds))
        _committed_tars_are_whole(tmp_path)
        if i == 6:  # a rejected input is in the ledger at the next commit; it waits for no tar
            assert ("/data/v6.mp4", 0) in Ledger(tmp_path).done
    driver.finish()
    _committed_tars_are_whole(tmp_path)
    assert read_ledger(tmp_path).num_rows == len(INPUTS)
    counts = {tar.name: pq.read_table(schema.index_path(tar)).num_rows for tar in sorted(tmp_path.rglob("*.tar"))}
    # 12 video_text samples: 3 per tar, however often the ledger committed (a tar closes between inputs)
    text_tars = [n for name, n in counts.items() if name.startswith("video_text")]
    assert text_tars[:-1] == [3] * (len(text_tars) - 1) and sum(text_tars) == 12


@pytest.mark.parametrize("crash_after", [3, 6, 8, 11])
def test_a_crash_leaves_no_ledger_row_naming_a_lost_tar(tmp_path, crash_after):
    driver = _driver(tmp_path, "shards.commit_every=2", "shards.maxcount=3")
    driver.crash_after = crash_after
    with pytest.raises(curate.SimulatedCrash):
        for i, kinds in enumerate(INPUTS):
            driver.receive(_rows(i, kinds))
    driver.sink.abort()
    remove_uncommitted(tmp_path, Ledger(tmp_path).shards)  # what the next run does first
    _committed_tars_are_whole(tmp_path)
    done = Ledger(tmp_path).done
    assert len(done) < crash_after  # the inputs in the open tars are redone
    # the resumed run redoes exactly the inputs the ledger lacks, and the output then holds each sample once
    again = curate._Driver(tmp_path, "rnext", Ledger(tmp_path), driver.cfg, total=0)
    for i, kinds in enumerate(INPUTS):
        if (f"/data/v{i}.mp4", 0) not in done:
            again.receive(_rows(i, kinds))
    again.finish()
    _committed_tars_are_whole(tmp_path)
    keys = [k for r in read_ledger(tmp_path).to_pylist() for k in r["keys"]]
    samples = [
        s["__key__"] for tar in sorted(tmp_path.rglob("*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False)
    ]
    assert sorted(keys) == sorted(samples) and len(set(samples)) == len(samples) == 14


def test_ledger_summary_and_done_filter_use_arrow(tmp_path):
    driver = _driver(tmp_path)
    for i, kinds in enumerate(INPUTS):
        driver.receive(_rows(i, kinds))
    driver.finish()
    ledger = Ledger(tmp_path)
    assert ledger.rows == len(INPUTS) and len(ledger.digests) == len(INPUTS) - 2
    listed = curate.to_table(
        [dict(r, occurrence=o) for r in _rows(0, ["video"]) + _rows(99, ["video"]) for o in (0, 1)]
    )
    [todo] = ledger.not_done([listed])
    assert sorted(zip(todo.column("source").to_pylist(), todo.column("occurrence").to_pylist())) == [
        ("/data/v0.mp4", 1),
        ("/data/v99.mp4", 0),
        ("/data/v99.mp4", 1),
    ]
    s = summarize(read_ledger(tmp_path, ["status", "stage", "reason", "kinds"]))
    assert summarize_ledger(tmp_path) == s  # a part at a time, the same totals
    assert (s["inputs"], s["accepted"], s["rejected"]) == (len(INPUTS), len(INPUTS) - 2, 2)
    assert s["samples"] == {"image": 0, "video_text": 12, "video": 2} and s["rejected_by_reason"] == {
        "quality:static": 2
    }
    assert json.loads(read_ledger(tmp_path).to_pylist()[8]["clips_rejected"]) == {"static": 2}


def test_the_listing_is_in_the_output_only_while_a_run_lasts(tmp_path, monkeypatch):
    # every row is rejected while listing, so no Ray starts
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": "", "caption": f"no path {i}"}) for i in range(5)) + "\n")
    out = tmp_path / "out"
    seen = []
    receive = curate._Driver.receive

    def spy(self, rows):
        seen.append(sorted(p.name for p in (out / curate.LISTING_DIR).iterdir()))
        receive(self, rows)

    monkeypatch.setattr(curate._Driver, "receive", spy)
    cfg = settings.load(curate.CurateConfig, None, ["progress=false"])
    monkeypatch.setenv(curate.CRASH_ENV, "2")
    with pytest.raises(curate.SimulatedCrash):
        curate.run(cfg, str(manifest), out)
    assert seen == [["rejected-00000.parquet"]]
    assert not (out / curate.LISTING_DIR).exists()  # a failed run leaves no listing: resuming uses the ledger

    monkeypatch.delenv(curate.CRASH_ENV)
    summary = curate.run(cfg, str(manifest), out)
    assert (summary["inputs"], summary["processed"], summary["rejected"]) == (5, 5, 5)
    assert not (out / curate.LISTING_DIR).exists()
    assert curate.run(cfg, str(manifest), out)["skipped_done"] == 5
