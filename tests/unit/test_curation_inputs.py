"""Every input form --input accepts lists the same inputs: manifests (CSV, Parquet, JSONL), media directories with
sidecar captions, and WebDataset tars (re-ingest). No Ray, no decoding: these tests are about listing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipelines.curation import inputs
from pipelines.curation.config import InputConfig
from pipelines.curation.stages.probe import read_bytes
from pipelines.settings import ConfigError


def _media(tmp_path):
    (tmp_path / "media").mkdir()
    for name in ("a.mp4", "b.png", "c.mp4"):
        (tmp_path / "media" / name).write_bytes(b"fake " + name.encode())
    return tmp_path / "media"


RECORDS = [
    {"path": "media/a.mp4", "caption": "a red circle moving left", "colour": "red"},
    {"path": "media/b.png", "caption": "a blue square", "colour": "blue"},
    {"path": "media/c.mp4", "caption": None, "colour": "green"},  # text-free
]


def _write_manifests(tmp_path):
    with open(tmp_path / "m.csv", "w", encoding="utf-8", newline="") as f:
        f.write("path,caption,colour\n")
        for r in RECORDS:
            f.write(f"{r['path']},{r['caption'] or ''},{r['colour']}\n")
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n", encoding="utf-8")


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.jsonl"])
def test_manifest_formats_list_the_same_inputs(tmp_path, name):
    media = _media(tmp_path)
    _write_manifests(tmp_path)
    rows = inputs.resolve(str(tmp_path / name), InputConfig())
    assert [r["source"] for r in rows] == [str(media / n) for n in ("a.mp4", "b.png", "c.mp4")]  # relative -> absolute
    assert [r["given"] for r in rows] == [r["path"] for r in RECORDS]
    assert [r["caption"] for r in rows] == ["a red circle moving left", "a blue square", None]
    assert [json.loads(r["labels"]) for r in rows] == [{"colour": c} for c in ("red", "blue", "green")]
    assert all(r["status"] == "ok" and r["origin"] == "manifest" and r["occurrence"] == 0 for r in rows)


def test_manifest_column_names_are_configurable_and_checked(tmp_path):
    _media(tmp_path)
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "media/a.mp4", "text": "a red circle", "x": 1}) + "\n")
    cfg = InputConfig(path_column="video", caption_column="text", label_columns=[])
    [row] = inputs.resolve(str(tmp_path / "m.jsonl"), cfg)
    assert row["caption"] == "a red circle" and json.loads(row["labels"]) == {}
    with pytest.raises(ConfigError, match="no 'path' column.*inputs.path_column"):
        inputs.resolve(str(tmp_path / "m.jsonl"), InputConfig())


def test_non_utf8_caption_is_flagged_not_fatal(tmp_path):
    _media(tmp_path)
    # with a byte-order mark, as spreadsheet programs write CSV: the header still names the path column
    (tmp_path / "m.csv").write_bytes(
        b"\xef\xbb\xbfpath,caption\nmedia/a.mp4,caf\xe9 au lait\nmedia/c.mp4,fine caption\n"
    )
    bad, good = inputs.resolve(str(tmp_path / "m.csv"), InputConfig())
    assert bad["caption_error"].startswith("invalid UTF-8") and "\ufffd" in bad["caption"]
    assert good["caption_error"] is None and good["caption"] == "fine caption"


def test_duplicates_and_unusable_rows_become_rejected_inputs(tmp_path):
    _media(tmp_path)
    (tmp_path / "m.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"path": "media/a.mp4", "caption": "first"}),
                json.dumps({"path": "media/a.mp4", "caption": "again"}),
                "{not json",
                json.dumps({"path": "", "caption": "no path"}),
            ]
        )
        + "\n"
    )
    rows = inputs.resolve(str(tmp_path / "m.jsonl"), InputConfig())
    assert [(r["status"], r["reason"], r["occurrence"]) for r in rows] == [
        ("ok", "", 0),
        ("rejected", "duplicate", 1),
        ("rejected", "bad_manifest_row", 0),
        ("rejected", "bad_manifest_row", 0),
    ]
    assert len({(r["source"], r["occurrence"]) for r in rows}) == 4  # every input keeps its own ledger identity


def test_directory_with_sidecar_captions(tmp_path):
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "one.mp4").write_bytes(b"x")
    (d / "one.txt").write_text("a caption from a txt sidecar\n")
    (d / "sub" / "two.jpg").write_bytes(b"x")
    (d / "sub" / "two.json").write_text(json.dumps({"caption": "from json", "colour": "red"}))
    (d / "three.webm").write_bytes(b"x")
    (d / "bad.mp4").write_bytes(b"x")
    (d / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (d / "notes.md").write_text("ignored: not media")
    (d / ".hidden.mp4").write_bytes(b"ignored: hidden")
    rows = {r["source"].rsplit("/", 1)[-1]: r for r in inputs.resolve(str(d), InputConfig())}
    assert sorted(rows) == ["bad.mp4", "one.mp4", "three.webm", "two.jpg"]
    assert rows["one.mp4"]["caption"] == "a caption from a txt sidecar\n"
    assert rows["two.jpg"]["caption"] == "from json" and json.loads(rows["two.jpg"]["labels"]) == {"colour": "red"}
    assert rows["three.webm"]["caption"] is None
    assert rows["bad.mp4"]["caption_error"] is not None
    assert all(r["origin"] == "dir" for r in rows.values())


def test_webdataset_tars_are_reingested_in_place(tmp_path):
    tar = tmp_path / "data-000000.tar"
    with wds.TarWriter(str(tar)) as w:
        w.write({"__key__": "s1", "mp4": b"video-bytes-1", "txt": "caption one", "json": {"labels": {"k": 1}}})
        w.write({"__key__": "s2", "jpg": b"jpeg-bytes-2", "json": {"caption": "from json"}})
        w.write({"__key__": "s3", "json": {"caption": "no media"}})
    for spec in (str(tar), str(tmp_path / "data-{000000..000000}.tar"), str(tmp_path)):
        rows = inputs.resolve(spec, InputConfig())
        assert [r["source"] for r in rows] == [f"{tar}#s1.mp4", f"{tar}#s2.jpg", f"{tar}#s3.none"]
    s1, s2, s3 = rows
    assert read_bytes(s1["uri"], s1["offset"], s1["length"]) == b"video-bytes-1"
    assert read_bytes(s2["uri"], s2["offset"], s2["length"]) == b"jpeg-bytes-2"
    assert (s1["caption"], json.loads(s1["labels"])) == ("caption one", {"k": 1})
    assert s2["caption"] == "from json"
    assert (s3["status"], s3["reason"]) == ("rejected", "no_media_member")


def test_missing_or_unknown_input_says_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*manifest"):
        inputs.resolve(str(tmp_path / "nope.csv"), InputConfig())
    (tmp_path / "x.docx").write_bytes(b"x")
    with pytest.raises(ConfigError, match="unknown input type"):
        inputs.resolve(str(tmp_path / "x.docx"), InputConfig())


def test_max_inputs_takes_the_first_n(tmp_path):
    _media(tmp_path)
    _write_manifests(tmp_path)
    rows = inputs.resolve(str(tmp_path / "m.csv"), InputConfig(max_inputs=2))
    assert [r["given"] for r in rows] == ["media/a.mp4", "media/b.png"]


def test_listing_is_written_as_bounded_parts_and_read_back_in_resolve_order(tmp_path):
    # 24 rows: 17 distinct sources (live), 6 repeats and one unreadable line (rejected while listing)
    lines = [json.dumps({"path": f"media/v{i % 17}.mp4", "caption": f"clip {i}"}) for i in range(23)]
    lines.insert(5, "{not json")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    folder = tmp_path / "out" / "_listing"
    folder.mkdir(parents=True)
    (folder / "live-00007.parquet").write_text("left by a killed run")
    rows = inputs.resolve(str(manifest), InputConfig())

    listing = inputs.write_listing(str(manifest), InputConfig(), folder, window=4, chunk=3)
    assert (listing.listed, listing.todo, listing.live_rows) == (24, 24, 17)
    # one window per live part: the driver holds at most `window` rows of the corpus
    assert [pq.ParquetFile(p).metadata.num_rows for p in listing.live] == [4, 4, 4, 4, 1]
    assert [pq.ParquetFile(p).metadata.num_rows for p in listing.rejected] == [3, 3, 1]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in listing.live + listing.rejected)
    live = [r for t in listing.read(listing.live) for r in t.to_pylist()]
    rejected = [r for t in listing.read(listing.rejected) for r in t.to_pylist()]
    # compared as repr: rows hold NaN (duration not probed yet), which never equals itself
    assert repr(live) == repr([r for r in rows if r["status"] == "ok"])
    assert repr(rejected) == repr([r for r in rows if r["status"] != "ok"])
    assert [r["occurrence"] for r in rejected if r["reason"] == "duplicate"] == [1] * 6

    # `keep` drops rows before they are written (a run drops what its ledger has)
    again = inputs.write_listing(str(manifest), InputConfig(), folder, window=4, keep=lambda t: t.slice(20))
    assert (again.listed, again.todo) == (24, 4)
    assert repr([r for t in again.read(again.live + again.rejected) for r in t.to_pylist()]) == repr(
        sorted(rows[20:], key=lambda r: r["status"] != "ok")
    )
