"""t2v bench <name> [args]   (t2v bench <name> --help for its options)

Benchmarks: one command that runs a named benchmark module, which prints its figures.

Each benchmark is a module with ``main(argv)`` that prints its figures as ratios against a baseline measured in
the same run; ``t2v bench <name> --help`` shows its own options.
"""

from __future__ import annotations

import sys

# name -> (module, what it measures)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "model": ("flows.benchmarks.model", "UNet forward/backward and sampling speed and memory"),
    "curate": ("flows.benchmarks.curate", "curation decode path against bare ffmpeg on the same inputs"),
    "train": ("flows.benchmarks.train", "training throughput with Ray Train + DeepSpeed"),
    "learn": ("flows.benchmarks.learn", "what the model learns on the shapes corpus (accuracy vs steps)"),
    "conditions": ("flows.benchmarks.conditions", "whether motion and edge-map conditions steer generation"),
    "masked": ("flows.benchmarks.masked", "image-to-video and inpainting with masked conditioning on held-out shapes"),
    "scale": ("flows.benchmarks.scale", "curation driver memory and files written on a 1M-row manifest"),
    "buckets": ("flows.benchmarks.buckets", "crop waste and loader throughput per bucket against one size"),
    "gpu": ("flows.benchmarks.gpu", "small and modelscope-1.7b on one GPU: clips/s, MFU, memory, vs a plain loop"),
}


def usage() -> str:
    lines = ["usage: t2v bench <name> [args]   (t2v bench <name> --help for its options)", "", "benchmarks:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from flows.cli import dispatch

    return dispatch("t2v bench", "benchmark", BENCHMARKS, argv, usage())


if __name__ == "__main__":
    sys.exit(main())
