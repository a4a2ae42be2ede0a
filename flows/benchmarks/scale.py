"""t2v bench scale [--rows 1000000] [--tiny-every 100] [--dir DIR] [--set key=value ...]

Does the curation driver's memory grow with the corpus? Lists and curates a synthetic manifest of ``--rows`` rows:
one in ``--tiny-every`` names a tiny file that is not media (rejected by the probe), the others name files that do
not exist (rejected at once). Nothing is decoded, so what is measured is the driver: listing, planning the blocks,
collecting rows, the ledger and the shards. Prints the driver's peak memory (RSS, sampled) against the 2 GB
target, the files the output holds per 10k inputs, and the time.

Also ``python -m flows.benchmarks.scale``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET_BYTES = 2 * 1024**3


class PeakRss:
    """Samples this process's resident memory every ``interval`` seconds in a background thread."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self.samples: list[int] = []  # one a second: does memory grow as the run goes on?
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.peak = max(self.peak, rss)
            if n % max(1, round(1 / self.interval)) == 0:
                self.samples.append(rss)
            n += 1
            self._stop.wait(self.interval)

    def quartiles(self) -> list[int]:
        """Resident memory at a quarter, half, three quarters and the end of the measured time."""
        s = self.samples or [self.peak]
        return [s[min(len(s) - 1, len(s) * q // 4)] for q in (1, 2, 3, 4)]

    def __enter__(self) -> PeakRss:
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def write_manifest(root: Path, rows: int, tiny_every: int) -> Path:
    tiny = root / "tiny"
    tiny.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.csv"
    with open(manifest, "w", encoding="utf-8") as f:
        f.write("path,caption\n")
        for i in range(rows):
            if tiny_every and i % tiny_every == 0:
                path = tiny / f"t{i:07d}.mp4"
                path.write_bytes(b"not a video\n")
            else:
                path = root / "missing" / f"m{i:07d}.mp4"
            f.write(f"{path},a red circle moving left number {i}\n")
    return manifest


def measure(rows: int, tiny_every: int, root: Path, overrides: list[str]) -> dict:
    from pipelines import settings
    from pipelines.curation import job as curate

    manifest = write_manifest(root, rows, tiny_every)
    out = root / "out"
    cfg = settings.load(curate.CurateConfig, None, ["progress=false", *overrides])
    started = time.time()
    with PeakRss() as rss:
        summary = curate.run(cfg, str(manifest), out)
    files = sum(len(fs) for _, _, fs in os.walk(out))
    return {
        "rows": rows,
        "processed": summary["processed"],
        "rejected": summary["rejected"],
        "peak_rss_bytes": rss.peak,
        "rss_quartiles": rss.quartiles(),
        "files": files,
        "files_per_10k": files * 10_000 / max(1, rows),
        "wall_s": time.time() - started,
    }


def format_result(r: dict) -> str:
    ok = "within" if r["peak_rss_bytes"] < TARGET_BYTES else "OVER"
    return "\n".join(
        [
            f"curate driver at scale: {r['rows']:,} manifest rows ({r['processed']:,} processed, "
            f"{r['rejected']:,} rejected) in {r['wall_s']:.0f} s",
            f"  peak driver memory  {r['peak_rss_bytes'] / 2**20:,.0f} MiB ({ok} the 2 GiB target)",
            "  memory at 1/4 .. end " + " / ".join(f"{b / 2**20:,.0f}" for b in r["rss_quartiles"]) + " MiB",
            f"  files written       {r['files']:,} ({r['files_per_10k']:.1f} per 10k inputs)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v bench scale", description=__doc__.split("\n\n")[1])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tiny-every", type=int, default=100, help="one row in N names a tiny non-media file")
    parser.add_argument("--dir", default=None, help="where the manifest and output go (default: a temp folder)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="curate setting key=value")
    args = parser.parse_args(argv)
    from pipelines import logs

    logs.setup()
    with tempfile.TemporaryDirectory(prefix="t2v-bench-scale-") as tmp:
        result = measure(args.rows, args.tiny_every, Path(args.dir or tmp), args.overrides)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
