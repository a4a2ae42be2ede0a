"""t2v sweep --data DIR --output DIR --set lr=[1e-3,3e-3] [--set key=[a,b] ...] [--config train.yaml] [--dry-run]

Trains one variant per combination of the listed values of any training setting (``t2v train``'s settings; a
setting that is itself a list sweeps over a list of lists, ``--set data=[[a],[a,b]]``) and groups them in MLflow:
a parent run with one child run per variant, each child the variant's training run with its evaluation curve
(``periodic_eval``, on by default here). After each variant the parent logs the comparison so far
(``comparison.md``: the settings that differ, final and best metrics; plots of each metric against step and
training minutes, as ``t2v compare --parent PARENT_RUN_ID`` prints). Variants train one after another under
``<output>/<n>-<name>/``; running the same command again continues the same parent run and skips finished
variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import re
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

from pipelines import local_ray, logs, settings
from pipelines.settings import ConfigError
from pipelines.training.config import TrainConfig

log = logging.getLogger("t2v.sweep")

PARENT_FILE = "parent_run.json"
# a sweep without its own evaluation settings still draws curves: a few shapes prompts every ~10% of the steps
DEFAULT_EVAL = {"num_prompts": 8, "sample_steps": 10, "max_share": 0.2}


def split_sets(items: list[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """``--set`` items -> (fixed items, {key: values}) where a list value for a non-list setting is a sweep axis."""
    fixed, axes = [], {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set lr=[1e-3,3e-3]")
        value = _exponents_as_numbers(settings._parse_value(raw))
        listy = _is_list_setting(TrainConfig, key.strip())
        if isinstance(value, list) and (not listy or (value and all(isinstance(v, list) for v in value))):
            if not value:
                raise ConfigError(f"--set {key}=[]: a sweep needs at least one value")
            axes[key.strip()] = value
        else:
            fixed.append(item)
    return fixed, axes


def _exponents_as_numbers(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; in a sweep's list of learning rates it means the number."""
    if isinstance(value, list):
        return [_exponents_as_numbers(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def _is_list_setting(cls: Any, dotted: str) -> bool:
    """Whether the setting at ``dotted`` takes a list (then a sweep over it is a list of lists)."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return False  # inside a dict setting (model_overrides, deepspeed): any value
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ConfigError(f"--set {dotted}: {part!r} is not a training setting (see t2v train --dry-run)")
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, type(int | None)):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) in (list, tuple) or tp in (list, tuple)


def variants(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, in the order given."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))] or [{}]


def variant_name(values: dict[str, Any]) -> str:
    return ",".join(
        f"{k.split('.')[-1]}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in values.items()
    )


# ---------------------------------------------------------------------------------------------------------------
# Parent run and children


def open_parent(out: Path, tracking_uri: str, experiment: str, name: str, params: dict[str, Any], tags: dict):
    """The parent run of ``out`` (reopened when the command runs again), with the grouping params and tags."""
    from pipelines import run_facts, tracking

    record = out / PARENT_FILE
    previous = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    run_id = previous.get("run_id") if previous.get("tracking_uri") == tracking_uri else None
    tags = {"t2v.kind": "parent", **run_facts.code_version(), **tags}
    parent = tracking.MlflowTracker(tracking_uri, experiment, run_id=run_id, run_name=name, tags=tags)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": parent.run_id, "tracking_uri": tracking_uri}), encoding="utf-8")
    parent.log_params(params)
    return parent


def child_config(cfg: TrainConfig, parent_run_id: str, name: str, output: Path) -> TrainConfig:
    """The variant's training config as a child run of the parent."""
    tags = {**cfg.mlflow.tags, "mlflow.parentRunId": parent_run_id, "t2v.variant": name}
    return dataclasses.replace(
        cfg, output=str(output), mlflow=dataclasses.replace(cfg.mlflow, run_name=name, tags=tags)
    )


def log_comparison(parent, run_ids: list[str], metrics: list[str] | None = None) -> str:
    """Compare the finished children and log the table and plots to the parent; returns the table."""
    from flows import compare

    client = parent.client
    runs = [client.get_run(r) for r in run_ids]
    with tempfile.TemporaryDirectory() as d:
        text, _ = compare.compare(client, runs, metrics or [], Path(d))
        parent.log_artifact(d, "comparison")
    return text


def run_children(parent, children: list[tuple[str, TrainConfig]], metrics: list[str] | None = None) -> list[dict]:
    """Train each child (skipping finished ones), updating the parent's comparison after each; returns results."""
    import ray

    from pipelines.training import job as train

    started = not ray.is_initialized()
    if started:  # one local Ray for all variants (starting it is the slowest part of a short run)
        if local_ray.is_local(None):
            local_ray.start()  # every port on 127.0.0.1
        else:
            ray.init()
    results, failed = [], []
    try:
        for name, cfg in children:
            log.info("variant %s -> %s", name, cfg.output)
            try:
                result = train.run(cfg)
            except Exception as e:  # one bad variant must not lose the others
                log.error("variant %s failed: %s", name, e)
                failed.append(name)
                continue
            results.append({"variant": name, **result})
            log_comparison(parent, [r["run_id"] for r in results], metrics)
    finally:
        if started:
            ray.shutdown()
    parent.set_tags({"t2v.variants": str(len(children)), "t2v.failed_variants": ",".join(failed) or "none"})
    parent.finish("FAILED" if failed and not results else "FINISHED")
    return results


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v sweep", description=__doc__.split("\n\n")[1])
    settings.add_arguments(parser)
    parser.add_argument("--data", action="append", default=None, metavar="DIR", help="curation output (repeatable)")
    parser.add_argument("--output", default="runs/sweep", help="one folder per variant under it")
    parser.add_argument("--name", default=None, help="the parent run's name (default: the swept keys)")
    args = parser.parse_args(argv)
    try:
        fixed, axes = split_sets(args.set)
        given = [f"data={json.dumps(args.data)}"] if args.data else []
        base = settings.load(TrainConfig, args.config, given + fixed)
        if not base.periodic_eval.enabled:
            every = max(1, base.steps // 10)
            evaluation = {**DEFAULT_EVAL, "every_steps": every}
            base = dataclasses.replace(base, periodic_eval=dataclasses.replace(base.periodic_eval, **evaluation))
        out = Path(args.output).resolve()
        plan = []
        for i, values in enumerate(variants(axes)):
            name = variant_name(values) or "base"
            sets = [f"{k}={json.dumps(v)}" for k, v in values.items()]
            cfg = settings.load(TrainConfig, None, sets, base=settings.to_dict(base))  # each variant checked now
            plan.append((name, cfg, out / f"{i}-{_slug(name)}"))
    except ConfigError as e:
        parser.error(str(e))
    if args.dry_run:
        print(settings.dump({"base": settings.to_dict(base), "axes": axes, "variants": [p[0] for p in plan]}), end="")
        return 0
    logs.setup()
    from pipelines import tracking

    uri = tracking.resolve_tracking_uri(base.mlflow.tracking_uri)
    name = args.name or ("sweep " + ", ".join(axes) if axes else "sweep")
    parent = open_parent(
        out,
        uri,
        base.mlflow.experiment,
        name,
        {"sweep": {"axes": json.dumps(axes), "variants": len(plan)}, "train": settings.to_dict(base)},
        {"t2v.sweep": ",".join(axes)},
    )
    children = [(n, child_config(c, parent.run_id, n, o)) for n, c, o in plan]
    results = run_children(parent, children)
    if results:
        print(log_comparison(parent, [r["run_id"] for r in results]))
    print(
        f"\nparent run {parent.run_id} in experiment {base.mlflow.experiment!r} ({settings.redact_uri(uri)}): "
        f"{len(results)} of {len(plan)} variants trained; t2v compare --parent {parent.run_id} --tracking-uri {uri}"
    )
    return 0 if len(results) == len(plan) else 1


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)[:60]


if __name__ == "__main__":
    sys.exit(main())
