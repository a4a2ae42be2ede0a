"""The ``t2v`` command: one subcommand per entry point, each forwarding to that module's ``main(argv)``.

t2v demo                       # the main job: re-training flow on embedded defaults
t2v corpus --output runs/corpus
t2v curate --input runs/corpus/manifest.csv --output runs/curated
t2v train --config my.yaml
t2v plan --config clusters/deepspeed/h100x8-zero2.yaml --gpus 8
t2v import --from tf-t2v tft2v.pth --out runs/imported/tf-t2v
t2v sample --checkpoint ckpt.pt --prompt "a red circle moving left" --out out.mp4
t2v style --checkpoint model.pt --style styled.pt --factor 0.6 --out blended.pt
t2v evaluate ... | t2v flow ... | t2v bench curate|model|train|learn|scale|buckets|gpu | t2v test
t2v sweep --data runs/curated --set lr=[1e-3,3e-3]
t2v compare RUN_ID RUN_ID | --experiment NAME | --parent RUN_ID
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("flows.demo", "run the main job (re-training flow) on embedded defaults and print where results are"),
    "corpus": ("pipelines.shapes", "generate the synthetic 'shapes' video/image corpus"),
    "curate": ("pipelines.curation.job", "decode, filter, route and shard a corpus with Ray Data"),
    "train": ("pipelines.training.job", "train the TF-T2V UNet with Ray Train + DeepSpeed"),
    "import": ("flows.import_weights", "turn released ModelScopeT2V / TF-T2V / SD 2.x weights into a checkpoint"),
    "sample": ("flows.sample", "generate a video from a prompt with a checkpoint"),
    "style": ("flows.style", "blend a fine-tuned style's spatial weights into a model by a factor"),
    "evaluate": ("flows.evaluate", "evaluate a model on a prompt set and log to MLflow"),
    "flow": ("flows.retrain", "run or serve the scheduled re-training flow"),
    "sweep": ("flows.sweep", "train one variant per value of swept settings, grouped as MLflow parent/child runs"),
    "compare": ("flows.compare", "compare MLflow runs: differing settings, final and best metrics, plots"),
    "plan": ("pipelines.training.memory_plan", "per-GPU memory and largest batch per ZeRO stage and offload choice"),
    "bench": ("flows.benchmarks", "run a benchmark (t2v bench --help lists them)"),
}

ROOT = Path(__file__).resolve().parent.parent
UNIT_WORKERS = min(4, os.cpu_count() or 1)


def run_tests(argv: list[str]) -> int:
    """``t2v test [pytest args]``: what CI runs, in order: ``ruff check``, ``ruff format --check``, ``lint-imports``
    (the layering contracts in pyproject.toml), then pytest: the unit tier on a process per core (pytest-xdist),
    then the integration tier (a path among the arguments runs just that, in one process). The first step that fails
    ends the command with its exit code and says how to fix it.
    """
    bin_dir = Path(sys.executable).parent  # the tools of the venv this runs in

    def shown(tool: str) -> str:
        path = bin_dir / tool
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    steps = [
        (
            "ruff check",
            [sys.executable, "-m", "ruff", "check", "."],
            f"run `{shown('ruff')} check --fix .`, then fix by hand what it reports as left",
        ),
        ("ruff format", [sys.executable, "-m", "ruff", "format", "--check", "."], f"run `{shown('ruff')} format .`"),
        (
            # the script, not `python -m importlinter.cli`: that module has no __main__ and would check nothing
            "lint-imports",
            [str(bin_dir / "lint-imports"), "--no-logo"],
            "an import crosses a layer ([tool.importlinter] in pyproject.toml): move the import or the code it needs",
        ),
    ]
    rerun = "see the failures above; rerun one with `t2v test tests/<tier>/<file>.py::<test>`"
    pytest = [sys.executable, "-m", "flows.run_pytest"]  # pytest without the interpreter teardown after it
    if any(a.startswith("tests") or a.endswith(".py") or "::" in a for a in argv):
        steps.append(("pytest", [*pytest, *argv], rerun))
    else:
        # the unit tier on one process per core (its tests share nothing); the integration tier shares one Ray
        steps.append(("pytest unit", [*pytest, "tests/unit", "-n", str(UNIT_WORKERS), *argv], rerun))
        steps.append(("pytest integration", [*pytest, "tests/integration", *argv], rerun))
    for name, cmd, fix in steps:
        print("+", " ".join(cmd), flush=True)
        try:
            code = subprocess.call(cmd, cwd=ROOT)
        except FileNotFoundError:
            code, fix = 127, f"{cmd[0]} is missing: install the test extra (`pip install -e '.[test]'`)"
        if code != 0:
            if name.startswith("pytest") and code == 5:
                fix = "no tests were collected: check the paths and -k/-m arguments"
            print(f"t2v test: {name} failed (exit {code}): {fix}", file=sys.stderr, flush=True)
            return code
    return 0


def usage() -> str:
    lines = ["usage: t2v <command> [args]  (t2v <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append(f"  {'test':<9} lint (ruff, import-linter) and run the test suite (arguments go to pytest)")
    return "\n".join(lines)


def dispatch(
    prog: str,
    noun: str,
    table: dict[str, tuple[str, str]],
    argv: list[str] | None,
    usage_text: str,
    special: dict | None = None,
) -> int:
    """``<prog> <name> [args]``: import ``table[name]``'s module and return its ``main(args)`` (``t2v``, ``t2v bench``).
    ``special`` maps names to functions called with the args instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage_text)
        return 0
    name, rest = argv[0], argv[1:]
    if special and name in special:
        return special[name](rest)
    if name not in table:
        print(f"{prog}: unknown {noun} {name!r}\n\n{usage_text}", file=sys.stderr)
        return 2
    module_name = table[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the module exists but one of its imports is missing: show the real error
        print(f"{prog}: {noun} {name!r} ({module_name}) is not part of this installation", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return dispatch("t2v", "command", COMMANDS, argv, usage(), special={"test": run_tests})


if __name__ == "__main__":
    sys.exit(main())
