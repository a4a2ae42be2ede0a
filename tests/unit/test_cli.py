"""The ``t2v`` command's own logic: ``t2v bench`` dispatches by name. The commands themselves are not run here."""

from __future__ import annotations


def test_bench_dispatches_by_name(capsys):
    from flows import benchmarks as bench

    assert bench.main([]) == 0 and "curate" in capsys.readouterr().out
    assert bench.main(["nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err
    assert set(bench.BENCHMARKS) == {"model", "curate", "train", "learn"}
