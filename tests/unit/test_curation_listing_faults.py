"""Listing hostile inputs: symlink loops and links to the same file, a CSV caption over the csv module's limit,
and JSON nested past Python's recursion limit. Listing ends, counts each real file once, and turns what it cannot
use into rejected rows with a reason, never an exception."""

from __future__ import annotations

import json
import os
import time

from pipelines.curation import inputs
from pipelines.curation.config import InputConfig


def test_symlink_loops_end_and_each_real_file_is_listed_once(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.mp4").write_bytes(b"y")
    os.symlink(".", tmp_path / "self")  # a loop onto the top
    os.symlink(tmp_path / "sub", tmp_path / "sub" / "up")  # a loop onto itself
    os.symlink(tmp_path / "x", tmp_path / "y")  # two links naming each other
    os.symlink(tmp_path / "y", tmp_path / "x")
    os.symlink(tmp_path / "a.mp4", tmp_path / "sub" / "again.mp4")  # the same file under another name
    started = time.monotonic()
    rows = inputs.resolve(str(tmp_path), InputConfig())
    assert time.monotonic() - started < 2
    assert sorted(os.path.basename(r["source"]) for r in rows) == ["a.mp4", "b.mp4"]


def test_bad_manifest_rows_are_rejections_and_listing_goes_on(tmp_path):
    big = "a red circle " * 20_000  # 260 KB: past the csv module's default 128 KiB field limit
    huge = "x" * (5 << 20)  # past any caption this project reads
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,caption\none.mp4,{big}\ntwo.mp4,{huge}\nthree.mp4,fine\n")
    rows = inputs.resolve(str(manifest), InputConfig())
    assert [(r["status"], r["reason"]) for r in rows] == [("ok", ""), ("rejected", "bad_manifest_row"), ("ok", "")]
    assert rows[0]["caption"] == big

    nested = "[" * 100_000 + "]" * 100_000
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join([json.dumps({"path": "a.mp4"}), f'{{"path": "b.mp4", "x": {nested}}}']) + "\n")
    rows = inputs.resolve(str(jsonl), InputConfig())
    assert [(r["status"], r["reason"]) for r in rows] == [("ok", ""), ("rejected", "bad_manifest_row")]


def test_a_sidecar_nested_past_the_recursion_limit_is_a_caption_error(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "a.json").write_text('{"caption": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (rows,) = inputs.resolve(str(tmp_path), InputConfig())
    assert rows["caption"] is None and "JSON" in rows["caption_error"]
