"""What ``--input`` may name, turned into one row per input (the rows the pipeline starts from).

Accepted forms (local paths, or any URI pyarrow's filesystems understand: ``s3://``, ``gs://``, ``hdfs://``):

- a manifest: ``.csv``, ``.parquet`` or ``.jsonl`` with a media path/URI column (``inputs.path_column``, default
  ``path``) and an optional caption column (``inputs.caption_column``, default ``caption``). Relative paths are
  relative to the manifest's folder (or ``inputs.media_root``). Other columns are kept as the sample's ``labels``
  (``inputs.label_columns`` picks some). An empty caption cell means "no caption".
- a directory of media files (searched recursively; video: mp4 mov mkv webm avi ...; image: jpg png webp ...)
  with optional sidecars: ``clip.mp4`` + ``clip.txt`` (the caption) and/or ``clip.json`` (``caption`` or
  ``text`` key; other keys become labels).
- existing WebDataset tars to re-ingest: a ``.tar`` file, a brace pattern (``shards/data-{000..009}.tar``), a
  directory of tars, or a curation output directory (its finished shards). Each sample's media member is read
  in place (byte range inside the tar); its ``txt`` (or json ``caption``) is the caption.

``source`` (the input's identity: sample keys derive from it, the ledger records it) is the resolved URI:
absolute local path, full remote URI, or ``<tar URI>#<member>``. ``given`` keeps the text as written.
Rows that cannot even be listed (a manifest row without a path, a tar sample without media) and repeated rows
of the same source become rejected inputs here (stage ``input``), so they are counted like every other input.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import durable, schema
from pipelines.curation.stages import OK, REJECTED, new_row, to_table
from pipelines.curation.stages.probe import MEDIA_EXTENSIONS, extension, filesystem, is_local
from pipelines.curation.stages.probe import local_path as local_path_of
from pipelines.settings import ConfigError

if TYPE_CHECKING:
    from pipelines.curation.config import InputConfig

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = {"csv": "csv", "parquet": "parquet", "pq": "parquet", "jsonl": "jsonl", "ndjson": "jsonl"}
_MEDIA_ORDER = ("mp4", "webm", "mkv", "mov", "avi", "m4v", "gif", "jpg", "jpeg", "png", "webp")


def resolve(spec: str, cfg: InputConfig) -> list[dict[str, Any]]:
    """``--input`` -> input rows (see the module docstring), duplicates marked, in a deterministic order. For small
    inputs and tests; a curation run lists into parquet parts instead (``write_listing``)."""
    return [r for t in iter_tables(spec, cfg) for r in t.to_pylist()]


def iter_tables(spec: str, cfg: InputConfig, chunk: int = 10_000) -> Iterator[pa.Table]:
    """The same rows as ``resolve``, as Arrow tables of at most ``chunk`` rows, made as the input is read (at least
    one table, perhaps empty): a row dict holds ~2 KB, its Arrow row a fifth of that."""
    pending: list[dict[str, Any]] = []
    marker = _DuplicateMarker()
    made = False
    for n, row in enumerate(_list(spec, cfg)):
        if cfg.max_inputs is not None and n >= cfg.max_inputs:
            break
        marker.mark(row, n)
        pending.append(row)
        if len(pending) == chunk:
            yield to_table(pending)
            pending, made = [], True
    if pending or not made:
        yield to_table(pending)


@dataclasses.dataclass
class Listing:
    """``--input``'s rows as parquet parts in a folder (see ``write_listing``): the driver reads back one part at a
    time, so its memory holds one window of inputs whatever the size of the corpus."""

    directory: Path
    live: list[Path] = dataclasses.field(default_factory=list)  # inputs to run, ``window`` rows a part
    rejected: list[Path] = dataclasses.field(default_factory=list)  # rejected while listing: already final
    listed: int = 0  # every row listed
    todo: int = 0  # rows ``keep`` kept (not done yet), live and rejected
    live_rows: int = 0

    @staticmethod
    def read(parts: list[Path]) -> Iterator[pa.Table]:
        for part in parts:
            yield pq.read_table(part)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class _PartWriter:
    """Tables in, parquet parts of exactly ``rows`` rows out (the last one may be shorter), each written atomically."""

    def __init__(self, directory: Path, prefix: str, rows: int, parts: list[Path]):
        self.directory, self.prefix, self.rows, self.parts = directory, prefix, rows, parts
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows:
            joined = pa.concat_tables(self.pending)
            self._write(joined.slice(0, self.rows))
            rest = joined.slice(self.rows)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.pending_rows:
            self._write(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0

    def _write(self, table: pa.Table) -> None:
        path = self.directory / f"{self.prefix}-{len(self.parts):05d}.parquet"
        with durable.atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        self.parts.append(path)


def write_listing(
    spec: str,
    cfg: InputConfig,
    directory: str | os.PathLike,
    window: int,
    keep: Callable[[pa.Table], pa.Table] | None = None,
    chunk: int = 10_000,
) -> Listing:
    """Lists ``spec`` (the rows of ``resolve``, in its order) into parquet parts in ``directory``, emptied first.
    ``keep`` drops rows before they are written (a run drops the inputs its ledger has). Inputs to run go to
    ``live-NNNNN.parquet`` parts of ``window`` rows (one Ray Data run each), inputs rejected while listing to
    ``rejected-NNNNN.parquet`` parts of ``chunk`` rows. Memory: a window and a chunk of rows, and the duplicate
    marker (``_DuplicateMarker``)."""
    listing = Listing(Path(directory))
    listing.remove()
    listing.directory.mkdir(parents=True)
    live = _PartWriter(listing.directory, "live", window, listing.live)
    rejected = _PartWriter(listing.directory, "rejected", chunk, listing.rejected)
    for table in iter_tables(spec, cfg, chunk):
        listing.listed += table.num_rows
        if keep is not None:
            table = keep(table)
        listing.todo += table.num_rows
        ok = pc.equal(table.column("status"), OK)
        live.add(table.filter(ok))
        rejected.add(table.filter(pc.invert(ok)))
    live.close()
    rejected.close()
    listing.live_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in listing.live)
    return listing


def describe(spec: str) -> str:
    """What kind of input ``spec`` is: manifest | dir | tar (ConfigError when it does not exist)."""
    if _is_pattern(spec) or extension(spec) == "tar":
        return "tar"
    ext = extension(spec)
    fsys, path = filesystem(spec)
    info = fsys.get_file_info(path)
    from pyarrow import fs

    if info.type == fs.FileType.NotFound:
        raise ConfigError(
            f"--input {spec!r} does not exist: pass a manifest (.csv/.parquet/.jsonl), a directory of "
            "media files, or WebDataset tars"
        )
    if info.type == fs.FileType.Directory:
        exts = {extension(p) for p in _walk(spec)}
        return "tar" if "tar" in exts and not exts & MEDIA_EXTENSIONS else "dir"
    if ext in MANIFEST_EXTENSIONS:
        return "manifest"
    raise ConfigError(
        f"--input {spec!r}: unknown input type .{ext}; pass a manifest (.csv, .parquet, .jsonl), "
        "a directory of media files, or WebDataset .tar shards"
    )


def _list(spec: str, cfg: InputConfig) -> Iterable[dict[str, Any]]:
    kind = describe(spec)
    if kind == "manifest":
        return read_manifest(spec, cfg)
    if kind == "dir":
        return read_directory(spec)
    return read_tars(tar_urls(spec))


def mark_duplicates(rows: list[dict[str, Any]]) -> None:
    """The n-th repeat of a source gets ``occurrence`` n and is rejected (stage input, reason duplicate): one
    source makes one set of samples, whatever the manifest says."""
    marker = _DuplicateMarker()
    for i, row in enumerate(rows):
        marker.mark(row, i)


class _DuplicateMarker:
    """Marks repeats row by row (see ``mark_duplicates``). The one structure of listing that grows with the inputs:
    per distinct source a 16-byte digest of it and the index of its first row (~120 bytes; ~120 MB for a million
    sources), and a count for each source that repeats."""

    def __init__(self) -> None:
        self.first: dict[bytes, int] = {}
        self.repeats: dict[bytes, int] = {}

    def mark(self, row: dict[str, Any], i: int) -> None:
        if row["status"] == REJECTED and row["reason"] == "bad_manifest_row":
            return
        # surrogatepass: a file name that is not UTF-8 (kept by surrogateescape) still has one distinct digest
        digest = hashlib.blake2b(row["source"].encode("utf-8", "surrogatepass"), digest_size=16).digest()
        first = self.first.setdefault(digest, i)
        if first == i:
            row["occurrence"] = 0
            return
        row["occurrence"] = self.repeats[digest] = self.repeats.get(digest, 0) + 1
        row.update(
            status=REJECTED,
            stage="input",
            reason="duplicate",
            detail=f"same source as input #{first} ({row['given']}); one source makes one set of samples",
        )


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _uri(base_spec: str, fs_path: str) -> str:
    """A path returned by a pyarrow filesystem -> a URI of the same scheme as ``base_spec``."""
    if is_local(base_spec):
        return os.path.abspath(fs_path)
    scheme = base_spec.split("://", 1)[0]
    return f"{scheme}://{fs_path}"


def _join(base_uri: str, rel: str) -> str:
    if is_local(base_uri):
        return os.path.abspath(os.path.join(base_uri, rel))
    scheme, rest = base_uri.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, rel))}"


def _parent(uri: str) -> str:
    if is_local(uri):
        return os.path.dirname(os.path.abspath(uri))
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}"


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    """Caption bytes -> (text, error). Undecodable UTF-8 keeps a replacement-character copy for the record."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return data.decode("utf-8", "replace"), f"invalid UTF-8 (byte 0x{data[e.start]:02x} at position {e.start})"


def _repair(text: str) -> str:
    """Text holding lone surrogates (undecodable bytes kept by ``surrogateescape``, or JSON "\\ud800" escapes) ->
    valid text with replacement characters, for the record."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _caption_from(value: Any) -> tuple[str | None, str | None]:
    """A manifest cell -> (caption or None when empty/missing, encoding error or None)."""
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray)):
        value, error = decode_text(bytes(value))
        return (value or None), error
    if not isinstance(value, str):
        value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return _repair(value) or None, f"invalid UTF-8 text at position {e.start}"
    return (value or None), None


def _plain(value: Any) -> Any:
    """A label value that JSON can hold."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if value is None or isinstance(value, (int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _bad_row(manifest: str, n: int, detail: str) -> dict[str, Any]:
    return new_row(
        source=f"{manifest}#row{n}",
        given=f"row {n}",
        origin="manifest",
        uri="",
        status=REJECTED,
        stage="input",
        reason="bad_manifest_row",
        detail=detail,
    )


# ---------------------------------------------------------------------------------------------------------------
# manifests


def _manifest_records(spec: str, fmt: str) -> Iterable[dict[str, Any] | Exception]:
    fsys, path = filesystem(spec)
    if fmt == "parquet":
        # batch by batch: the whole manifest as row dicts would take ~2 KB an input
        with fsys.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=10_000):
                yield from batch.to_pylist()
        return
    # surrogateescape keeps undecodable bytes addressable, so one bad caption does not sink the whole manifest
    if fmt == "csv":
        with fsys.open_input_stream(path) as f:  # streamed: the driver never holds the whole manifest
            yield from _csv_records(io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline=""))
        return
    with fsys.open_input_stream(path) as f:
        data = f.read()
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    for n, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested past Python's stack
            yield ValueError(f"line {n + 1} is not usable JSON: {type(e).__name__}: {str(e)[:200]}")
            continue
        yield record if isinstance(record, dict) else ValueError(f"line {n + 1} is not a JSON object")


MAX_CELL_CHARS = 4 << 20  # a CSV cell longer than this is a bad row (the csv module's default limit is 128 KiB)


def _csv_records(text: Iterable[str]) -> Iterable[dict[str, Any] | Exception]:
    """CSV rows (from a text stream opened with ``newline=""``) as dicts; a row the csv module cannot parse (a cell
    over MAX_CELL_CHARS, a NUL byte) becomes an Exception in its place, and reading goes on with the next row."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CELL_CHARS))
    reader = csv.reader(text)
    header: list[str] | None = None
    n = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if header is None:
                raise ConfigError(f"the manifest's header row cannot be read as CSV: {e}") from None
            yield ValueError(f"line {reader.line_num} cannot be read as CSV: {e}")
            n += 1
            continue
        if header is None:
            header = cells
            continue
        if not cells:
            continue
        n += 1
        yield dict(zip(header, cells + [None] * (len(header) - len(cells))))


def read_manifest(spec: str, cfg: InputConfig) -> Iterable[dict[str, Any]]:
    fmt = MANIFEST_EXTENSIONS[extension(spec)]
    manifest_uri = _uri(spec, filesystem(spec)[1])
    root = cfg.media_root or _parent(manifest_uri)
    warned = False
    for n, record in enumerate(_manifest_records(spec, fmt)):
        if isinstance(record, Exception):
            yield _bad_row(manifest_uri, n, str(record))
            continue
        if n == 0 and cfg.path_column not in record:
            raise ConfigError(
                f"manifest {spec} has no {cfg.path_column!r} column (columns: {sorted(record)}); "
                f"name the media column with --set inputs.path_column=NAME"
            )
        if n == 0 and cfg.caption_column not in record and not warned:
            log.warning(
                "manifest %s has no %r column: every video becomes text-free and every image is rejected "
                "(name the caption column with --set inputs.caption_column=NAME)",
                spec,
                cfg.caption_column,
            )
            warned = True
        given = record.get(cfg.path_column)
        if isinstance(given, bytes):
            given = given.decode("utf-8", "replace")
        if not given or not str(given).strip():
            yield _bad_row(manifest_uri, n, f"empty {cfg.path_column!r} cell")
            continue
        given = str(given).strip()
        if _repair(given) != given:
            yield _bad_row(manifest_uri, n, f"the path {_repair(given)!r} is not valid UTF-8")
            continue
        uri = given if "://" in given else (os.path.abspath(given) if os.path.isabs(given) else _join(root, given))
        caption, error = _caption_from(record.get(cfg.caption_column))
        names = (
            cfg.label_columns
            if cfg.label_columns is not None
            else [k for k in record if k not in (cfg.path_column, cfg.caption_column)]
        )
        labels = {k: _plain(record.get(k)) for k in names if k in record}
        yield new_row(
            source=uri,
            given=given,
            origin="manifest",
            uri=uri,
            caption=caption,
            caption_error=error,
            labels=json.dumps(labels, sort_keys=True),
        )


# ---------------------------------------------------------------------------------------------------------------
# directories of media files


def _walk_local(top: str) -> list[str]:
    """Files under a local directory, following links to directories but never one twice (no link loop can
    make the listing endless) and each real file once (under the first path that reaches it), hidden entries
    left out."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    out: list[str] = []
    stack = [os.path.abspath(top)]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list %s: %s", d, e)
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows links; the (device, inode) check above ends loops
                    subdirs.append(entry.path)
                elif entry.is_file():
                    fst = entry.stat()
                    if (fst.st_dev, fst.st_ino) not in seen_files:
                        seen_files.add((fst.st_dev, fst.st_ino))
                        out.append(entry.path)
            except OSError:  # a dangling link, or one into a loop the OS refuses (ELOOP)
                continue
        stack.extend(reversed(subdirs))
    return sorted(out)


def _walk(spec: str) -> list[str]:
    from pyarrow import fs

    if is_local(spec):
        return _walk_local(local_path_of(spec))
    fsys, path = filesystem(spec)
    infos = fsys.get_file_info(fs.FileSelector(path, recursive=True))
    return sorted(
        i.path
        for i in infos
        if i.type == fs.FileType.File and not any(part.startswith(".") for part in i.path[len(path) :].split("/"))
    )


def read_directory(spec: str) -> Iterable[dict[str, Any]]:
    fsys, top = filesystem(spec)
    files = _walk(spec)
    present = set(files)
    manifests = [p for p in files if extension(p) in MANIFEST_EXTENSIONS and posixpath.dirname(p) == top.rstrip("/")]
    if manifests:
        log.warning(
            "%s holds %s: captions are read from sidecar .txt/.json files only; pass the manifest itself "
            "as --input to use its captions",
            spec,
            ", ".join(posixpath.basename(m) for m in manifests),
        )
    for path in files:
        if extension(path) not in MEDIA_EXTENSIONS:
            continue
        stem = path.rsplit(".", 1)[0]
        caption, error, labels = None, None, {}
        if stem + ".json" in present:
            try:
                with fsys.open_input_stream(stem + ".json") as f:
                    side = json.loads(f.read())
                if isinstance(side, dict):
                    text = side.pop("caption", side.pop("text", None))
                    caption, error = _caption_from(text)
                    labels = {k: _plain(v) for k, v in side.items()}
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                error = f"sidecar {posixpath.basename(stem)}.json is not usable JSON: {type(e).__name__}"
        if stem + ".txt" in present:
            with fsys.open_input_stream(stem + ".txt") as f:
                caption, error = decode_text(f.read())
            caption = caption or None
        uri = _uri(spec, path)
        yield new_row(
            source=uri,
            given=uri,
            origin="dir",
            uri=uri,
            caption=caption,
            caption_error=error,
            labels=json.dumps(labels, sort_keys=True),
        )


# ---------------------------------------------------------------------------------------------------------------
# WebDataset tars (re-ingest)


def _is_pattern(spec: str) -> bool:
    return bool(re.search(r"\{[^}]*\.\.[^}]*\}|[*?\[]", spec))


def tar_urls(spec: str) -> list[str]:
    """Every tar a tar-type ``--input`` names, sorted."""
    if _is_pattern(spec):
        import braceexpand

        urls: list[str] = []
        for item in braceexpand.braceexpand(spec):
            if re.search(r"[*?\[]", item):
                if not is_local(item):
                    raise ConfigError(
                        f"--input {spec!r}: glob patterns work for local paths only; use a brace "
                        "pattern like s3://bucket/data-{000..009}.tar"
                    )
                import glob

                urls.extend(os.path.abspath(p) for p in glob.glob(item))
            else:
                urls.append(item if not is_local(item) else os.path.abspath(item))
        if not urls:
            raise ConfigError(f"--input {spec!r} matches no files")
        return sorted(set(urls))
    if extension(spec) == "tar":
        return [spec if not is_local(spec) else os.path.abspath(spec)]
    fsys, path = filesystem(spec)
    # a curation output directory: re-ingest its finished shards only
    if fsys.get_file_info(posixpath.join(path, schema.SHARDS_DIR)).type.name == "Directory" and is_local(spec):
        return [u for kind in schema.KINDS for u in schema.shard_urls(spec, kind)]
    return [_uri(spec, p) for p in _walk(spec) if extension(p) == "tar"]


def _split_member(name: str) -> tuple[str | None, str | None]:
    """WebDataset's rule: the key is everything up to the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


def read_tars(urls: list[str]) -> Iterable[dict[str, Any]]:
    for url in urls:
        fsys, path = filesystem(url)
        with fsys.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key is None:
                    continue
                groups.setdefault(key, {})[ext] = member
            for key, members in groups.items():
                media_ext = next((e for e in _MEDIA_ORDER if e in members), None)
                if media_ext is None:
                    media_ext = next((e for e in members if e in MEDIA_EXTENSIONS), None)
                source = f"{url}#{key}.{media_ext or 'none'}"
                if media_ext is None:
                    yield new_row(
                        source=source,
                        given=source,
                        origin="tar",
                        uri=url,
                        status=REJECTED,
                        stage="input",
                        reason="no_media_member",
                        detail=f"sample {key} has members {sorted(members)} but no video or image",
                    )
                    continue
                caption, error, labels = None, None, {}
                if "json" in members:
                    meta = _read_json(f, members["json"])
                    if isinstance(meta, dict):
                        caption, error = _caption_from(meta.get("caption", meta.get("text")))
                        labels = (
                            meta.get("labels")
                            if isinstance(meta.get("labels"), dict)
                            else {k: v for k, v in meta.items() if k not in ("caption", "text")}
                        )
                        labels = _plain(labels)
                if "txt" in members:
                    caption, error = decode_text(f.read_at(members["txt"].size, members["txt"].offset_data))
                    caption = caption or None
                m = members[media_ext]
                yield new_row(
                    source=source,
                    given=source,
                    origin="tar",
                    uri=url,
                    offset=m.offset_data,
                    length=m.size,
                    caption=caption,
                    caption_error=error,
                    labels=json.dumps(labels, sort_keys=True),
                )


def _read_json(f, member: tarfile.TarInfo) -> Any:
    try:
        return json.loads(f.read_at(member.size, member.offset_data))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
