"""The scale benchmark at 2k rows: the driver lists and curates a manifest of missing and tiny files, and prints
its peak memory and the files written per 10k inputs (``t2v bench scale`` runs it at 1M rows)."""

from __future__ import annotations

from flows.benchmarks import scale


def test_scale_benchmark_measures_driver_memory_and_files(ray_session, tmp_path, capsys):
    # in windows of 500 inputs: four Ray Data runs, one driver
    args = ["--rows", "2000", "--tiny-every", "50", "--dir", str(tmp_path), "--set", "window_inputs=500"]
    assert scale.main(args) == 0
    out = capsys.readouterr().out
    assert "2,000 manifest rows (2,000 processed, 2,000 rejected)" in out
    assert "within the 2 GiB target" in out and "per 10k inputs" in out and "memory at 1/4 .. end" in out
