"""t2v bench <name> [args]   (t2v bench curate | model | train | learn; t2v bench <name> --help)

Benchmarks: one command that runs a named benchmark module, which prints its figures.

Each benchmark is a module with ``main(argv)`` that prints its figures as ratios against a baseline measured in
the same run; ``t2v bench <name> --help`` shows its own options.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, what it measures)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "model": ("model.bench", "UNet forward/backward and sampling speed and memory"),
    "curate": ("pipelines.bench_curate", "curation throughput (inputs/s, samples/s) against a serial baseline"),
    "train": ("pipelines.bench_train", "training throughput with Ray Train + DeepSpeed"),
    "learn": ("pipelines.bench_learn", "what the model learns on the shapes corpus (accuracy vs steps)"),
}


def usage() -> str:
    lines = ["usage: t2v bench <name> [args]   (t2v bench <name> --help for its options)", "", "benchmarks:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"t2v bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = BENCHMARKS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the benchmark exists but one of its imports is missing: show the real error
        print(f"t2v bench: benchmark {name!r} ({module_name}) is not part of this installation", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
