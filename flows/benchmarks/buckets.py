"""t2v bench buckets [--videos 32] [--batches 12] [--dir DIR] [--set key=value ...]

What aspect buckets cost and save, against the single-size setting in the same run. Generates ``--videos``
videos of coloured shapes in four aspects (16:9, 9:16, 4:3, 1:1), curates them twice with ``t2v curate``'s Ray
job (one 64x64 size; buckets 64x64, 112x64, 64x112, 80x60, clips of 8 and 16 frames), then prints:

1. crop waste: the mean fraction of each source's pixels the resize-and-crop threw away, single size against
   buckets, and per bucket;
2. loader throughput per bucket (samples/s and megapixels/s of ``TrainLoader`` alone, batches of that bucket
   only) against the single-size loader (``shapes=model``) on the single-size shards.

``--set`` applies to both curation runs. Also ``python -m flows.benchmarks.buckets``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ASPECTS = [(128, 72), (72, 128), (96, 72), (96, 96)]  # 16:9, 9:16, 4:3, 1:1 sources
SINGLE = ["clips.width=64", "clips.height=64", "clips.num_frames=8"]
BUCKETED = ["clips.buckets=[64x64,112x64,64x112,80x60]", "clips.lengths=[8,16]"]
COMMON = ["clips.fps=8", "quality.min_side=32", "quality.motion_max=1", "progress=false"]


def write_corpus(root: Path, videos: int) -> Path:
    from pipelines import media, shapes

    root.mkdir(parents=True, exist_ok=True)
    colours, directions = ["red", "green", "blue", "yellow"], ["left", "right", "up", "down"]
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        for i in range(videos):
            w, h = ASPECTS[i % len(ASPECTS)]
            colour, direction = colours[i // 4 % 4], directions[i // 16 % 4]
            frames = shapes.render_video(colour, "circle", direction, w, h, 24)  # 3 s at 8 fps
            path = media.write_mp4(frames, root / f"v{i:04d}.mp4", 8)
            writer.writerow([path, f"a {colour} circle moving {direction}"])
    return manifest


def crop_waste(root: Path) -> dict[str, float]:
    """Mean crop fraction over the curated videos' clips, overall ("all") and per bucket."""
    from pipelines import loader, schema

    per: dict[str, list[float]] = defaultdict(list)
    for s in loader.find_shard_sets([str(root)]):
        for text in s.index()["json"]:
            meta = schema.SampleMeta.from_json(text)
            per[meta.bucket].append(float(meta.extra.get("crop_fraction", 0.0)))
    everything = [v for vs in per.values() for v in vs]
    return {"all": sum(everything) / max(1, len(everything)), **{k: sum(v) / len(v) for k, v in sorted(per.items())}}


def loader_rate(spec, batches: int) -> tuple[float, float]:
    """(samples/s, megapixels/s) of ``TrainLoader`` alone over ``batches`` batches after a warm-up batch."""
    from pipelines import loader

    data = loader.TrainLoader(spec)
    try:
        next(data)
        t0, samples, pixels = time.perf_counter(), 0, 0
        for _ in range(batches):
            b = next(data)
            samples += len(b.video)
            pixels += sum(it.frames.size // 3 for it in b.video)
        dt = time.perf_counter() - t0
    finally:
        data.close()
    return samples / dt, pixels / dt / 1e6


def measure(videos: int, batches: int, root: Path, overrides: list[str]) -> dict:
    from pipelines import loader, settings
    from pipelines.curation import job as curate

    manifest = write_corpus(root / "corpus", videos)
    outs = {}
    for name, sets in (("single", SINGLE), ("buckets", BUCKETED)):
        cfg = settings.load(curate.CurateConfig, None, [*COMMON, *sets, *overrides])
        outs[name] = root / name
        curate.run(cfg, str(manifest), outs[name])
    base = dict(image_batch=0, video_batch=4, num_frames=8, height=64, width=64, prefetch=1, decode_workers=1)
    single = loader_rate(loader.LoaderSpec(data=[str(outs["single"])], **base), batches)
    inventory = loader.bucket_inventory(loader.find_shard_sets([str(outs["buckets"])]))
    shapes = sorted({shape for by_shape in inventory.values() for shape in by_shape})
    per_bucket = {
        shape: loader_rate(
            loader.LoaderSpec(
                data=[str(outs["buckets"])], shapes="buckets", bucket_weights={shape: 1.0}, size_multiple=4, **base
            ),
            batches,
        )
        for shape in shapes
    }
    return {
        "videos": videos,
        "crop_single": crop_waste(outs["single"]),
        "crop_buckets": crop_waste(outs["buckets"]),
        "loader_single": single,
        "loader_buckets": per_bucket,
    }


def format_result(r: dict) -> str:
    single, bucketed = r["crop_single"], r["crop_buckets"]
    lines = [
        f"buckets vs one size on {r['videos']} videos of 4 aspects (16:9, 9:16, 4:3, 1:1)",
        f"  crop waste (share of source pixels lost)  one size 64x64: {single['all']:.1%}   "
        f"buckets: {bucketed['all']:.1%}",
    ]
    lines += [f"    {k:<8} {v:.1%}" for k, v in bucketed.items() if k != "all"]
    rate, mpix = r["loader_single"]
    lines.append(f"  loader, one size 64x64_8f (shapes=model): {rate:7.1f} samples/s  {mpix:6.2f} Mpixel/s")
    for shape, (rate_b, mpix_b) in r["loader_buckets"].items():
        lines.append(
            f"  loader, bucket {shape:<12}           {rate_b:7.1f} samples/s  {mpix_b:6.2f} Mpixel/s "
            f"({mpix_b / mpix:.2f}x the one-size pixel rate)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v bench buckets", description=__doc__.split("\n\n")[1])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="video batches timed per bucket")
    parser.add_argument("--dir", default=None, help="where the corpus and outputs go (default: a temp folder)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="curate setting key=value")
    parser.add_argument("--dry-run", action="store_true", help="print the two curation configs and stop")
    args = parser.parse_args(argv)
    if args.videos < 4 or args.batches < 1:
        parser.error("--videos must be >= 4 (one per aspect) and --batches >= 1")
    from pipelines import logs, settings
    from pipelines.curation.config import CurateConfig

    if args.dry_run:
        for name, sets in (("single", SINGLE), ("buckets", BUCKETED)):
            print(f"# {name}\n{settings.dump(settings.load(CurateConfig, None, [*COMMON, *sets, *args.overrides]))}")
        return 0
    logs.setup()
    with tempfile.TemporaryDirectory(prefix="t2v-bench-buckets-") as tmp:
        result = measure(args.videos, args.batches, Path(args.dir or tmp), args.overrides)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
