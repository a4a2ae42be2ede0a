"""t2v curate --input runs/corpus/manifest.csv --output runs/curated [--config curate.yaml] [--set key=value ...]

Also ``python -m pipelines.curation.job ...`` (the Ray job entrypoint), same arguments. Curates a video/image corpus
into WebDataset shards with Ray Data:

    inputs -> probe -> quality (resolution, duration) -> decode + clip -> quality (motion)
           -> caption filter (text rules + OpenCLIP, actor pool) -> route (image | video_text | video)
           [-> pre-encode (optional, actor pool)] -> shards + ledger (driver)

Local Ray by default; ``--address ray://head:10001`` (or RAY_ADDRESS) runs on a cluster. Running the same
command again skips inputs the ledger already has and writes no duplicates; a run that was killed resumes.
``--dry-run`` prints the resolved config. See ``pipelines/schema.py`` for the output layout.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from pipelines import durable, local_ray, logs, schema, settings
from pipelines.curation import inputs as inputs_mod
from pipelines.curation.config import CONFIG_FILE, SHAPING, CurateConfig
from pipelines.curation.ledger import (
    Ledger,
    input_result,
    quarantine_unreadable,
    remove_uncommitted,
    summarize_ledger,
)
from pipelines.curation.stages import OK, REJECTED, STAGES, TRANSIENT, to_table
from pipelines.lease import Lease
from pipelines.settings import ConfigError

log = logging.getLogger("t2v.curate")

# Ray and Ray Data keep 80-110 KB of bookkeeping per block in the driver (t2v bench scale): at most 4,000 blocks
# bound that part near 400 MB (the default window of 20k inputs has at most 1,250 blocks: 16 inputs per task).
MAX_BLOCKS = 4_000
LISTING_DIR = "_listing"  # this run's inputs as parquet parts (inputs.write_listing); removed when the run ends
LEASE_FILE = ".curate.lease"  # one run per output at a time, from any host (pipelines/lease.py)
# Test hook: raise SimulatedCrash after this many inputs were written but before their commit (what a kill
# between two commits leaves behind). Only tests set it.
CRASH_ENV = "T2V_CURATE_CRASH_AFTER"


# ---------------------------------------------------------------------------------------------------------------
# Run


class SimulatedCrash(RuntimeError):
    """Raised by the CRASH_ENV test hook."""


def run(cfg: CurateConfig, input: str, output: str | os.PathLike, address: str | None = None) -> dict[str, Any]:
    """Curate ``input`` into ``output``; returns the run summary (also written to ``<output>/summary.json``).

    Incremental: inputs already in the output's ledger are skipped, so calling it again with a grown manifest (or
    a new one) adds only the new inputs.
    """
    started = time.time()
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.encode.mode != "none":
        _check_encode(cfg)
    with Lease(out / LEASE_FILE, what="curate run") as lease:
        _check_compatible(cfg, out)
        quarantine_unreadable(out)
        ledger = Ledger(out)
        removed = remove_uncommitted(out, ledger.shards)
        # the listing goes to parquet parts in the output, read back a window at a time: the driver's memory is
        # sized by the window, not the corpus. Resuming needs only the ledger, so the listing never outlives a run.
        try:
            listing = _list_inputs(input, cfg, out, ledger)
            listed, todo = listing.listed, listing.todo
            run_id = time.strftime("r%Y%m%dT%H%M%S", time.gmtime()) + uuid.uuid4().hex[:6]
            log.info(
                "curate %s -> %s: %d inputs listed, %d already done, %d to do (run %s)",
                input,
                out,
                listed,
                listed - todo,
                todo,
                run_id,
            )
            driver = _Driver(out, run_id, ledger, cfg, total=todo)
            driver.lease = lease
            ray_start_s = 0.0
            pipeline_started = time.time()
            try:
                # rejected while listing (duplicates, unusable manifest rows): already final
                for t in listing.read(listing.rejected):
                    driver.receive(t.to_pylist())
                if listing.live_rows:
                    _warn_about_models(cfg)
                    ray_start_s = init_ray(address, cfg.num_cpus, cfg.task_cpus)
                    pipeline_started = time.time()
                    _run_pipeline(listing, cfg, driver)
            except BaseException:
                driver.sink.abort()  # no commit: the next run removes these tars and redoes their inputs
                raise
            driver.finish()
            pipeline_s = time.time() - pipeline_started
        finally:
            shutil.rmtree(out / LISTING_DIR, ignore_errors=True)
    summary = _summary(driver, input, out, listed, todo, removed, started, ray_start_s, pipeline_s)
    _write_json(out / schema.SUMMARY_FILE, summary)
    return summary


def _list_inputs(input: str, cfg: CurateConfig, out: Path, ledger: Ledger) -> inputs_mod.Listing:
    """``input``'s rows the ledger does not have yet, as listing parts in ``out`` (``inputs.write_listing``)."""
    done = ledger.done_ids()  # (freed on return: for a big resumed output, one string per committed input)
    return inputs_mod.write_listing(
        input, cfg.inputs, out / LISTING_DIR, cfg.window_inputs, keep=lambda t: ledger.not_done([t], done)[0]
    )


def local_ray_system_config(num_cpus: int | None, task_cpus: float) -> dict[str, Any]:
    """Ray settings for a local Ray: keep a worker process per decode-task slot. By default Ray keeps only as many
    idle workers as CPUs, so with task_cpus 0.5 a short pause would stop half the workers and the next tasks
    would pay for new ones (mostly imports). On a cluster, set the same in the cluster's config."""
    cpus = num_cpus or os.cpu_count() or 1
    return {"num_workers_soft_limit": max(cpus, math.ceil(cpus / task_cpus))}


def init_ray(address: str | None, num_cpus: int | None, task_cpus: float) -> float:
    """Connect to Ray unless already connected; returns the seconds it took. ``address`` (or RAY_ADDRESS) joins
    a cluster; otherwise a local Ray starts (``local_ray_system_config``)."""
    t = time.time()
    if local_ray.is_local(address):
        local_ray.prepare()
    import ray  # (importing Ray is part of its start-up cost: several seconds)

    if ray.is_initialized():
        return 0.0
    if address:
        # A client outside the cluster ships this project's code to the workers.
        import model
        import pipelines

        ray.init(address=address, runtime_env={"py_modules": [model, pipelines]}, log_to_driver=True)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside a Ray job, or pointed at a cluster by the environment
    else:
        # With the dashboard (on 127.0.0.1 only), which serves the State API: Ray Train's placement-group cleaner
        # polls it every second and, without it, logs a warning each time for the whole of a training run.
        local_ray.start(
            num_cpus=num_cpus,
            logging_level=logging.WARNING,
            _system_config=local_ray_system_config(num_cpus, task_cpus),
        )
    return time.time() - t


def _gpus_available() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def _not_finished(table: pa.Table, done: set[tuple[str, int]]) -> list[bool]:
    return [
        (s, o) not in done for s, o in zip(table.column("source").to_pylist(), table.column("occurrence").to_pylist())
    ]


def _run_pipeline(listing: inputs_mod.Listing, cfg: CurateConfig, driver: _Driver) -> None:
    """Every live input through the pipeline into the driver, one listing part (``cfg.window_inputs`` inputs) at a
    time: one Ray Data run per window, so the rows in memory, Ray's bookkeeping and the driver's set of finished
    inputs are sized by the window, not the corpus. Inputs whose tasks' workers died past ``task_retries`` are run
    alone (``isolate.run_alone``): poison inputs end rejected, the others as usual."""
    import ray

    ctx = ray.data.DataContext.get_current()
    errored_before = ctx.max_errored_blocks
    # a block whose task failed past its retries is dropped, not the run: its inputs are found missing below
    ctx.max_errored_blocks = -1
    try:
        for window in listing.read(listing.live):
            _run_window(window, cfg, driver)
    finally:
        ctx.max_errored_blocks = errored_before


def _run_window(live: pa.Table, cfg: CurateConfig, driver: _Driver) -> None:
    import ray

    from pipelines.curation import isolate

    for batch in build_dataset(live, cfg).iter_batches(batch_size=None, batch_format="pyarrow"):
        driver.receive(batch.to_pylist())
    missing = driver.missing(live)
    if missing:
        tables = isolate.run_alone(missing, cpu_stages(cfg), cfg, driver.receive)
        if tables:
            for batch in _tail(ray.data.from_arrow(tables), cfg).iter_batches(batch_size=None, batch_format="pyarrow"):
                driver.receive(batch.to_pylist())
        for row in driver.missing(missing):  # lost after the CPU stages: a model stage's worker died
            driver.receive([isolate._rejected(row, isolate.WORKER_CRASH, "a model stage's worker died on it")])
    driver.finished.clear()  # every input of the window came back or was rejected: done with it


def cpu_stages(cfg: CurateConfig) -> list:
    """The stages that run as tasks before the model stages: probe, input quality, decode, clip quality."""
    from pipelines.curation.stages.caption import model_enabled
    from pipelines.curation.stages.decode import ClipDecoder
    from pipelines.curation.stages.probe import Probe
    from pipelines.curation.stages.quality import ClipQuality, InputQuality

    return [
        Probe(cfg),
        InputQuality(cfg),
        ClipDecoder(cfg, keep_keyframes=model_enabled(cfg.caption)),
        ClipQuality(cfg),
    ]


def _task_args(cfg: CurateConfig) -> dict[str, Any]:
    # bounded retries when a worker dies (Ray Data retries for ever by default); exceptions are never retried:
    # the stages turn them into rejections themselves
    return {"num_cpus": cfg.task_cpus, "max_retries": cfg.task_retries, "retry_exceptions": False}


def build_dataset(rows: list[dict[str, Any]] | pa.Table, cfg: CurateConfig):
    """The Ray Data pipeline over input rows (all stages; see the module docstring). Nothing runs until iterated."""
    import ray

    # max_retries and retry_exceptions have no named map_batches parameter in the pinned Ray; passed as remote args
    # they work, and Ray warns of a removal in a version the pin does not reach. (Added after Ray's import, which
    # puts its own filter for these warnings first.)
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", module=__name__)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.enable_progress_bar_name_truncation = False  # the stage names are the progress line; Ray warns if it cuts
    # Decode tasks ask for task_cpus = 0.5 by default: two tasks per core, so while one task waits on Ray (its
    # input block, handing its output over) the other keeps the core busy.
    # Blocks: each task costs Ray and Ray Data a fixed overhead, so blocks are as large as still balances the load,
    # about 4 tasks per task slot (decode work is uneven: a long video against an image), 1 to 16 inputs each, and
    # never more than MAX_BLOCKS blocks for the driver to track.
    if cfg.inputs_per_task:
        n = cfg.inputs_per_task
    else:
        slots = max(1.0, ray.cluster_resources().get("CPU", 1) / cfg.task_cpus)
        n = min(16, max(1, math.ceil(len(rows) / (4 * slots))))
    n = max(n, math.ceil(len(rows) / MAX_BLOCKS))
    if isinstance(rows, pa.Table):
        blocks = [rows.slice(i, n) for i in range(0, rows.num_rows, n)]
    else:
        blocks = [to_table(rows[i : i + n]) for i in range(0, len(rows), n)]
    ds = ray.data.from_arrow(blocks)
    # CPU stages run as tasks; Ray fuses consecutive ones into a single task per block.
    for stage in cpu_stages(cfg):
        ds = ds.map_batches(stage, batch_size=None, batch_format="pyarrow", **_task_args(cfg))
    return _tail(ds, cfg)


def _tail(ds, cfg: CurateConfig):
    """The stages after the CPU stages: caption filter, route, optional pre-encoding."""
    from pipelines.curation.stages.caption import CaptionFilter, model_enabled
    from pipelines.curation.stages.route import Route

    clip_model = model_enabled(cfg.caption)
    use_gpu = cfg.caption.device != "cpu" and _gpus_available()
    _check_cpu_budget(
        cfg, clip_model, use_gpu, cfg.encode.mode != "none" and not (cfg.encode.device != "cpu" and _gpus_available())
    )
    # Model stages run as actor pools placed with SPREAD: on a cluster the model copies land on different nodes,
    # and, because the decode tasks ask for no placement, Ray Data does not fuse the decode tasks into the actor
    # pool (with equal CPU requests it would, and every block would then decode inside the one model actor).
    pool_args = {"scheduling_strategy": "SPREAD"}
    if clip_model:
        ds = ds.map_batches(
            CaptionFilter,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=cfg.caption.batch_size,
            batch_format="pyarrow",
            concurrency=cfg.caption.actors,
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else cfg.caption.actor_cpus,
            **pool_args,
        )
    else:
        ds = ds.map_batches(CaptionFilter(cfg), batch_size=None, batch_format="pyarrow", **_task_args(cfg))
    ds = ds.map_batches(Route(cfg), batch_size=None, batch_format="pyarrow", **_task_args(cfg))
    if cfg.conditions.kinds:
        from pipelines.curation.stages.conditions import ExtractConditions

        ds = ds.map_batches(ExtractConditions(cfg), batch_size=None, batch_format="pyarrow", **_task_args(cfg))
    if cfg.encode.mode != "none":
        from pipelines.curation.stages.encode import PreEncoder

        use_gpu = cfg.encode.device != "cpu" and _gpus_available()
        ds = ds.map_batches(
            PreEncoder,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=cfg.encode.batch_size,
            batch_format="pyarrow",
            concurrency=cfg.encode.actors,
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else cfg.encode.actor_cpus,
            **pool_args,
        )
    return ds


def _check_cpu_budget(cfg: CurateConfig, clip_on_cpu_pool: bool, clip_gpu: bool, encode_on_cpu: bool) -> None:
    """Actor pools hold their CPUs for the whole run; if they hold them all, the decode tasks never start."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    held = (cfg.caption.actors * cfg.caption.actor_cpus if clip_on_cpu_pool and not clip_gpu else 0) + (
        cfg.encode.actors * cfg.encode.actor_cpus if encode_on_cpu else 0
    )
    if held and total - held < cfg.task_cpus:
        raise ConfigError(
            f"the CPU actor pools would hold {held:g} of the cluster's {total:g} CPUs, leaving none for "
            "decoding; lower caption.actors/caption.actor_cpus or encode.actors/encode.actor_cpus "
            "(e.g. --set caption.actor_cpus=0.5), or add CPUs"
        )


class _Driver:
    """Collects finished rows in the driver: groups them by input and writes complete inputs' samples into the
    shards. A tar is closed and indexed when it holds ``shards.maxcount`` samples or ``shards.maxsize`` bytes,
    checked between inputs, so an input's samples of one kind are in one tar. Ledger parts are written every
    ``shards.commit_every`` inputs, when a tar closes, and at the end; a part holds only inputs whose every tar is
    indexed (rejected inputs have none), so an accepted input's ledger row never names a tar a crash can lose.
    Inputs still waiting for their tar are at most the samples of one open tar per kind."""

    def __init__(self, out: Path, run_id: str, ledger: Ledger, cfg: CurateConfig, total: int):
        from pipelines.curation.stages.write import ShardSink

        self.out, self.run_id, self.ledger, self.cfg, self.total = out, run_id, ledger, cfg, total
        self.sink = ShardSink(out, run_id, cfg.shards.maxcount, cfg.shards.maxsize, roll=False)
        self.partial: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.uncommitted: list[dict[str, Any]] = []
        self.since_commit = 0  # inputs finished since the last ledger part
        # counts of this run's ledger rows (the rows themselves go to the ledger: memory must not grow with inputs)
        self.processed = self.accepted = 0
        self.rejected_by_reason: collections.Counter = collections.Counter()
        self.samples_by_kind: collections.Counter = collections.Counter()
        self.clip_reasons: collections.Counter = collections.Counter()
        self.stage_rejections: collections.Counter = collections.Counter()
        self.transient: collections.Counter = collections.Counter()  # inputs left for the next run, by reason
        self.finished: set[tuple[str, int]] = set()  # inputs of this window the pipeline handed back whole
        self.clips_made = 0
        self.commits = 0
        self.written_inputs = 0
        self.crash_after = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None
        self.lease = None
        self.last_log = time.time()
        self.started = time.time()

    def receive(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            ident = (row["source"], row["occurrence"])
            group = self.partial.setdefault(ident, [])
            group.append(row)
            if len(group) >= row["input_rows"]:
                del self.partial[ident]
                self._complete(group)
        if self.cfg.progress and time.time() - self.last_log > 10:
            self.last_log = time.time()
            rate = self.processed / max(1e-9, time.time() - self.started)
            log.info(
                "curate: %d/%d inputs done (%.1f/s), %d samples written",
                self.processed,
                self.total,
                rate,
                sum(self.sink.samples.values()),
            )

    def missing(self, rows: list[dict[str, Any]] | pa.Table) -> list[dict[str, Any]]:
        """Those of ``rows`` (input rows) that came back from no task, or not whole: their tasks failed. Rows of
        them received so far were never written, and are dropped."""
        if isinstance(rows, pa.Table):
            rows = rows.filter(pa.array(_not_finished(rows, self.finished), pa.bool_())).to_pylist()
        lost = [r for r in rows if (r["source"], r["occurrence"]) not in self.finished]
        for r in lost:
            self.partial.pop((r["source"], r["occurrence"]), None)
        return lost

    def _complete(self, rows: list[dict[str, Any]]) -> None:
        self.finished.add((rows[0]["source"], rows[0]["occurrence"]))
        if not any(r["status"] == OK for r in rows) and any(r["status"] == TRANSIENT for r in rows):
            # not the input's fault: no ledger row, so the next run tries it again
            worst = next(r for r in rows if r["status"] == TRANSIENT)
            self.transient[f"{worst['stage']}:{worst['reason']}"] += 1
            log.warning("transient fault on %s, left for the next run: %s", worst["source"], worst["detail"])
            return
        full = self.sink.full()
        if full and any(r["status"] == OK for r in rows):
            self.commit(full)  # between two inputs: no input's samples of one kind span two tars
        shard_of = {}
        for row in rows:
            is_clip = row["num_frames"] > 0  # made by decode (input-level rows have no frames yet)
            self.clips_made += is_clip
            if row["status"] == OK:
                shard_of[row["key"]] = self.sink.write(row)
            else:
                self.stage_rejections[row["stage"]] += 1
                if is_clip:
                    self.clip_reasons[f"{row['stage']}:{row['reason']}"] += 1
        result = input_result(rows, shard_of)
        self.uncommitted.append(result)
        self.processed += 1
        self.accepted += result["status"] == "accepted"
        if result["status"] == REJECTED:
            self.rejected_by_reason[f"{result['stage']}:{result['reason']}"] += 1
        self.samples_by_kind.update(result["kinds"])
        self.written_inputs += 1
        self.since_commit += 1
        if self.crash_after is not None and self.written_inputs >= self.crash_after:
            raise SimulatedCrash(f"{CRASH_ENV}={self.crash_after}: stopping as if killed before a commit")
        if self.since_commit >= self.cfg.shards.commit_every:
            self.commit([])

    def commit(self, kinds: list[str] | None = None) -> None:
        """Close and index the tars of ``kinds`` (all when None), then append a ledger part with every waiting
        input none of whose tars is still unindexed."""
        if self.lease is not None:
            self.lease.check()  # a run whose lease was taken over must not commit into the output any more
        if kinds is not None:
            # an input with samples of several kinds (some clips captioned, some text-free) closes its other
            # tars too: a closed tar must hold only inputs this commit records
            closing, grew = set(kinds), True
            while grew:
                grew = False
                for r in self.uncommitted:
                    mine = set(r["kinds"])
                    if mine & closing and not mine <= closing:
                        closing |= mine
                        grew = True
            kinds = sorted(closing)
        self.sink.commit(kinds)
        unindexed = self.sink.unindexed()
        ready = [r for r in self.uncommitted if not unindexed.intersection(r["shards"])]
        if ready:
            self.ledger.append(ready, self.run_id, self.commits)
            self.commits += 1
            self.uncommitted = [r for r in self.uncommitted if unindexed.intersection(r["shards"])]
        self.since_commit = 0

    def finish(self) -> None:
        if self.partial:  # cannot happen unless a stage broke the row contract; say so rather than lose inputs
            raise RuntimeError(
                f"{len(self.partial)} input(s) came back incomplete from the pipeline, e.g. {next(iter(self.partial))}"
            )
        self.commit()


def _summary(driver: _Driver, input: str, out: Path, listed, todo, removed, started, ray_start_s, pipeline_s):
    by_reason, samples, accepted = driver.rejected_by_reason, driver.samples_by_kind, driver.accepted
    wall = time.time() - started
    written = sum(samples.values())
    return {
        "run": driver.run_id,
        "input": input,
        "output": str(out),
        "inputs": listed,
        "skipped_done": listed - todo,
        "processed": driver.processed,
        "accepted": accepted,
        "rejected": driver.processed - accepted,
        # transient faults (full temp disk, I/O, network): not in the ledger, retried by the next run
        "transient": sum(driver.transient.values()),
        "transient_by_reason": dict(sorted(driver.transient.items())),
        "samples": {k: samples.get(k, 0) for k in schema.KINDS},
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "stages": {s: {"rejected": driver.stage_rejections.get(s, 0)} for s in STAGES},
        "clips": {
            "made": driver.clips_made,
            "written": written,
            "rejected_by_reason": dict(sorted(driver.clip_reasons.items())),
        },
        "throughput": {
            "wall_s": round(wall, 3),
            "ray_start_s": round(ray_start_s, 3),
            "pipeline_s": round(pipeline_s, 3),
            "inputs_per_s": round(driver.processed / max(pipeline_s, 1e-9), 3),
            "samples_per_s": round(written / max(pipeline_s, 1e-9), 3),
            "mb_written": round(driver.sink.bytes_written / 1e6, 3),
        },
        "removed_partial_shards": len(removed),
        "totals": summarize_ledger(out),
        "shards": {k: len(schema.shard_urls(out, k)) for k in schema.KINDS},
    }


# ---------------------------------------------------------------------------------------------------------------
# Output-directory guards


def _get(d: dict, dotted: str) -> Any:
    # a key missing from a config saved before it existed reads as unset (None), its default
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _check_compatible(cfg: CurateConfig, out: Path) -> None:
    """Refuse to add samples of another shape to an existing output; record the config on the first run."""
    path = out / CONFIG_FILE
    current = settings.to_dict(cfg)
    if path.exists():
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        diff = [
            f"{k}: {_get(saved, k)!r} -> {_get(current, k)!r}" for k in SHAPING if _get(saved, k) != _get(current, k)
        ]
        if diff:
            raise ConfigError(
                f"{out} holds samples curated with other settings ({'; '.join(diff)}); use a new "
                "--output, or the same settings"
            )
    else:
        durable.write_text(path, settings.dump(cfg))


def _check_encode(cfg: CurateConfig) -> None:
    """Pre-encoded clips are only useful to a model that takes clips of this shape: say so before any work."""
    e, c = cfg.encode, cfg.clips
    if e.checkpoint:
        from model.registry import ModelConfig
        from model.text_to_video import read_checkpoint

        model = settings.from_dict(ModelConfig, read_checkpoint(e.checkpoint)["config"])
    else:
        from model.registry import get_config

        model = get_config(e.model, e.model_overrides)
    if c.buckets is not None or c.image_buckets is not None or c.lengths is not None:
        # bucket training takes each bucket at its own shape: every size must be one the model can take
        multiple = model.vae_factor * model.unet.downsample_factor
        bad = [f"{w}x{h}" for w, h in dict.fromkeys(c.video_sizes + c.image_sizes) if w % multiple or h % multiple]
        if bad:
            raise ConfigError(
                f"encode: model {model.name!r} takes heights and widths that are multiples of {multiple} pixels; "
                f"bucket(s) {', '.join(bad)} are not: change them in clips.buckets / clips.image_buckets"
            )
        return
    if (model.num_frames, model.height, model.width) != (c.num_frames, c.height, c.width):
        raise ConfigError(
            f"encode: model {model.name!r} takes {model.num_frames} frames of {model.width}x{model.height} but the "
            f"clips are {c.num_frames} frames of {c.width}x{c.height}; set clips.num_frames={model.num_frames} "
            f"clips.width={model.width} clips.height={model.height}, or pick the matching model"
        )


def _warn_about_models(cfg: CurateConfig) -> None:
    c = cfg.caption
    if c.filter == "auto" and c.pretrained is None:
        log.warning(
            "no pretrained CLIP weights (caption.pretrained): the caption-similarity filter is off and "
            "captions are checked by the text rules only. To enable it, pass a local open_clip weights file: "
            "--set caption.pretrained=/path/to/%s.bin",
            c.model,
        )
    elif c.filter == "clip" and c.pretrained is None:
        log.warning(
            "caption.filter=clip without caption.pretrained: %s has random weights, so its similarity "
            "scores are noise (fine for tests, not for data)",
            c.model,
        )


def _write_json(path: Path, data: dict) -> None:
    durable.write_text(path, json.dumps(data, indent=2, sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------
# CLI


def format_summary(s: dict[str, Any]) -> str:
    t = s["throughput"]
    lines = [
        f"curated {s['input']} -> {s['output']} (run {s['run']})",
        f"  inputs          {s['inputs']:>8}   ({s['skipped_done']} already done, {s['processed']} processed)",
        f"  accepted        {s['accepted']:>8}",
        f"  rejected        {s['rejected']:>8}",
    ]
    for reason, n in s["rejected_by_reason"].items():
        lines.append(f"    {reason:<30} {n:>6}")
    if s["transient"]:
        lines.append(f"  transient       {s['transient']:>8}   (not the inputs' fault; the next run retries them)")
        for reason, n in s["transient_by_reason"].items():
            lines.append(f"    {reason:<30} {n:>6}")
    if s["clips"]["rejected_by_reason"]:
        lines.append("  clips dropped (of accepted inputs and others)")
        for reason, n in s["clips"]["rejected_by_reason"].items():
            lines.append(f"    {reason:<30} {n:>6}")
    lines.append("  samples written " + ", ".join(f"{k} {v}" for k, v in s["samples"].items()))
    lines.append(
        f"  time            {t['wall_s']:.1f} s (Ray start {t['ray_start_s']:.1f} s, pipeline "
        f"{t['pipeline_s']:.1f} s: {t['inputs_per_s']:.2f} inputs/s, {t['samples_per_s']:.2f} samples/s, "
        f"{t['mb_written']:.1f} MB)"
    )
    tot = s["totals"]
    lines.append(
        f"  output totals   {tot['inputs']} inputs: {tot['accepted']} accepted, {tot['rejected']} rejected; "
        + ", ".join(f"{k} {v}" for k, v in tot["samples"].items())
    )
    lines.append(
        f"  ledger: {Path(s['output']) / schema.LEDGER_FILE}   summary: {Path(s['output']) / schema.SUMMARY_FILE}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2v curate",
        description="Curate a video/image corpus into WebDataset shards with Ray Data (see the module docstring).",
    )
    parser.add_argument("--input", help="manifest (.csv/.parquet/.jsonl), media directory, or WebDataset tars")
    parser.add_argument("--output", help="output directory (shards/, ledger.parquet, summary.json)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local Ray)")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = settings.resolve(parser, CurateConfig, args)
    if cfg is None:
        return 0
    if not args.input or not args.output:
        parser.error("--input and --output are required (or --dry-run to print the config)")
    logs.setup()
    try:
        summary = run(cfg, args.input, args.output, address=args.address)
    except ConfigError as e:
        print(f"t2v curate: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
