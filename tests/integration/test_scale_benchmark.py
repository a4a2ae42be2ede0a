"""The scale benchmark at 2k rows: the driver lists and curates a manifest of missing and tiny files, and prints
its peak memory and the files written per 10k inputs (``t2v bench scale`` runs it at 1M rows)."""

from __future__ import annotations

from flows.benchmarks import scale


def test_scale_benchmark_measures_driver_memory_and_files(ray_session, tmp_path, capsys):
    assert scale.main(["--rows", "2000", "--tiny-every", "50", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2,000 manifest rows (2,000 processed, 2,000 rejected)" in out
    assert "within the 2 GiB target" in out and "per 10k inputs" in out
