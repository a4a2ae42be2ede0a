"""Concurrent runs on one output: a lease with an owner, a heartbeat and stale take-over, held by a real second
process, then by a process that is really killed, and by another host (a lease file written as it would)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines import settings
from pipelines.curation import job as curate
from pipelines.lease import Lease, LeaseLost
from pipelines.settings import ConfigError

HOLD = """
import sys, time
from pipelines.lease import Lease
lease = Lease(sys.argv[1], what="test run", heartbeat_s=0.2, stale_s=5).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_live_holder_keeps_the_lease_and_a_killed_one_loses_it(tmp_path):
    path = tmp_path / ".lease"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {proc.pid}"):
            Lease(path, what="test run", stale_s=5).acquire()
        beat = json.loads(path.read_text())["heartbeat"]
        time.sleep(0.6)
        assert json.loads(path.read_text())["heartbeat"] > beat  # the holder's heartbeat runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with Lease(path, what="test run", stale_s=5) as lease:  # a dead holder on this host: taken over at once
        assert json.loads(path.read_text())["owner"] == lease.owner
    assert not path.exists()  # released


def test_another_hosts_lease_is_respected_while_fresh_and_taken_over_when_stale(tmp_path):
    path = tmp_path / ".lease"
    other = {"owner": "x", "host": "another-host", "pid": 1, "heartbeat": time.time()}
    path.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="another-host"):
        Lease(path, stale_s=30).acquire()
    path.write_text(json.dumps(dict(other, heartbeat=time.time() - 120)))
    lease = Lease(path, stale_s=30, heartbeat_s=0.1).acquire()
    try:
        # and the holder whose lease was taken over stops before it writes anything more
        path.write_text(json.dumps(dict(other, heartbeat=time.time())))
        with pytest.raises(LeaseLost):
            lease.check()
    finally:
        lease.release()
    assert path.exists()  # never deletes a lease it does not hold


def test_a_second_curate_run_on_a_leased_output_stops_before_it_touches_anything(tmp_path, shapes_corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / curate.LEASE_FILE).write_text(
        json.dumps({"owner": "x", "host": "another-host", "pid": 1, "heartbeat": time.time()})
    )
    cfg = settings.load(curate.CurateConfig, None, ["progress=false"])
    with pytest.raises(ConfigError, match="another curate run"):
        curate.run(cfg, str(shapes_corpus), out)
    assert sorted(p.name for p in out.iterdir()) == [curate.LEASE_FILE]


def test_an_unreadable_ledger_part_is_quarantined_and_its_inputs_redone(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.curation.ledger import QUARANTINE_DIR, Ledger, ledger_dir, quarantine_unreadable, read_ledger

    row = {
        "source": "/a.mp4",
        "given": "a.mp4",
        "occurrence": 0,
        "status": "rejected",
        "stage": "probe",
        "reason": "missing_file",
        "detail": "",
        "keys": [],
        "kinds": [],
        "shards": [],
        "clips_rejected": "{}",
        "media_type": "",
        "origin": "manifest",
    }
    Ledger(tmp_path).append([row], "r1", 0)
    Ledger(tmp_path).append([dict(row, source="/b.mp4")], "r1", 1)
    broken = ledger_dir(tmp_path) / "part-r1-000001.parquet"
    broken.write_bytes(b"")  # what a crash on a file system without ordered writes can leave
    assert read_ledger(tmp_path).column("source").to_pylist() == ["/a.mp4"]  # readable, with a warning

    assert quarantine_unreadable(tmp_path) == [broken.name]
    assert (ledger_dir(tmp_path) / QUARANTINE_DIR / broken.name).exists()
    assert Ledger(tmp_path).done == {("/a.mp4", 0)}  # /b.mp4 is redone by the next run
    assert pq.read_table(ledger_dir(tmp_path)).num_rows == 1  # other readers of the directory skip the quarantine
