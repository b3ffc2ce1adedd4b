"""Batch rendering: a manifest of (portrait, audio) rows -> one mp4 per row + results.parquet.

Two ways to run the same RenderWorker:
- through the Serve `Renderer` deployment (default): rows go through a DeploymentHandle, so batch
  and HTTP renders share the replicas (and their autoscaling); the app is started when none runs
  and removed again at the end;
- `standalone`: a Ray Data actor pool (one actor per GPU, or per CPU slot here) renders the rows.

Each row: `id` (optional; a plain name, the output file is OUT/<id>.mp4), `portrait`, `audio`
(paths, relative ones resolved against the manifest's folder; a re-voicing avatar's rows give the audio
alone: it speaks over its own footage), and optional `steps`, `sampler`,
`guidance`, `seed`, `paste_back` (true/false; empty: the job's, by default auto) and `max_side`. A
row whose mp4 exists is not rendered again (re-runs resume; its record says status "done", reused
true); a bad row is recorded with status "failed" and its reason and never stops the others; files
appear only when complete. The mp4 is written by the renderer straight into OUT when OUT is on its
machine; a renderer on another node sends the bytes back. Until then it has a hidden temporary name
that does not end in .mp4 (`.ID.mp4.*part`), so a batch killed mid-encode leaves nothing that `*.mp4`
finds, and its re-run removes those temporaries first (one batch at a time per OUT).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm import tqdm

from letstalk.accel import InferenceOptions
from letstalk.diffusion import Sampler
from letstalk.paste import DEFAULT_MAX_SIDE

from .render import APP_NAME, MAX_SIDE, MIN_SIDE, RenderDefaults, RenderOptions, RenderWorker, check_name, one_line
from .runtime import local_target, node_id

OPTION_COLUMNS = ("steps", "sampler", "guidance", "seed", "paste_back", "max_side")
RESULT_FIELDS = ("row", "id", "portrait", "audio", "status", "reused", "error", "output", "frames", "clips",
                 "duration_s", "steps", "sampler", "paste_back", "max_side", "dtype", "seconds_total",
                 "seconds_denoise", "seconds_decode", "finished_at")


class BatchConfig(BaseModel):
    """Settings of jobs/render_batch.py (YAML keys; flags override them)."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description=".csv, .jsonl or .parquet with columns portrait, audio (a re-voicing avatar: "
                          "audio alone) "
                          "[, id, steps, sampler, guidance, seed, paste_back, max_side]")
    out: str = Field(description="output folder: <id>.mp4 per row and results.parquet")
    model: str | None = Field(None, description="bundle folder or models:/<name>@<alias> (needed unless the app runs)")
    mlflow_uri: str | None = Field(None, description="registry for models:/ URIs (None: $MLFLOW_TRACKING_URI)")
    app: str = Field(APP_NAME, description="the Serve application to use, or to start from `model`")
    standalone: bool = Field(False, description="render on a Ray Data actor pool instead of the Serve app")
    concurrency: int | None = Field(None, ge=1, description="rows in flight (Serve; None: 2) or actors "
                                    "(standalone; None: 1)")
    use_gpu: bool = Field(False, description="one GPU per renderer replica / actor")
    cpus: float = Field(1.0, ge=0, description="CPUs per renderer replica / actor")
    steps: int | None = Field(None, description="for rows without their own (None: the renderer's default)")
    sampler: Sampler | None = Field(None, description="for rows without their own")
    guidance: float | None = Field(None, description="for rows without their own")
    paste_back: bool | None = Field(None, description="for rows without their own: paste the face back into the "
                                    "portrait (the video has its size); --no-paste-back: the square face crop; "
                                    "None: auto, on when the portrait is larger than the model's crop")
    max_side: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description=(
        f"for rows without their own: with paste-back, the video's longer side at most ({MIN_SIDE}..{MAX_SIDE}; "
        f"None: {DEFAULT_MAX_SIDE})"))
    progress: bool = Field(True, description="a progress bar")
    inference: dict = Field(default_factory=lambda: InferenceOptions().to_dict(),
                            description="speed switches of the renderers this job starts (letstalk.accel)")

    @field_validator("inference")
    @classmethod
    def _check_inference(cls, value: dict) -> dict:
        return InferenceOptions.from_dict(value).to_dict()

    def defaults(self) -> RenderDefaults:
        """The render defaults for rows that leave them out (the renderer's own where None here)."""
        given = {"steps": self.steps, "sampler": self.sampler, "guidance": self.guidance}
        return RenderDefaults.model_validate({k: v for k, v in given.items() if v is not None})

    def row_options(self) -> dict:
        """Job-wide options that rows without their own take (given to each row: a renderer that runs
        already keeps its own defaults, but these reach it)."""
        given = {"paste_back": self.paste_back, "max_side": self.max_side}
        return {k: v for k, v in given.items() if v is not None}


@dataclass
class Item:
    row: int
    id: str
    portrait: str
    audio: str
    options: dict = field(default_factory=dict)
    error: str | None = None  # set when the row is invalid before any rendering


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows of a .csv, .jsonl or .parquet manifest as dicts (a clear error if the file is unusable)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {str(path)!r} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="") as f:  # every value as text: ids like 007 stay 007
                rows = [dict(r) for r in csv.DictReader(f)]
        elif suffix in (".jsonl", ".ndjson"):
            rows = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"line {n} is not a JSON object")
                    rows.append(row)
        elif suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        else:
            raise ValueError(f"unsupported manifest type {suffix!r}: use .csv, .jsonl or .parquet")
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"manifest {path.name}: cannot be read ({one_line(e, 200)})") from None
    if not rows:
        raise ValueError(f"manifest {path.name} has no rows")
    if "audio" not in set().union(*(r.keys() for r in rows)):
        raise ValueError(f"manifest {path.name} lacks column(s) ['audio']; needs portrait, audio (a re-voicing "
                         f"avatar: audio alone; optional: id, {', '.join(OPTION_COLUMNS)})")
    return rows


def plan_items(rows: list[dict], base: Path, options: dict | None = None) -> list[Item]:
    """Validate each row on its own: ids, paths, options; a bad row gets an error, not an exception.
    `options`: the job's, for rows without their own (BatchConfig.row_options)."""
    items, seen = [], set()
    for i, row in enumerate(rows):
        portrait, audio = row.get("portrait"), row.get("audio")
        raw_id = row.get("id")
        item_id = str(raw_id).strip() if not _is_missing(raw_id) else f"row{i:05d}"
        item = Item(i, item_id, "" if _is_missing(portrait) else str(portrait), "" if _is_missing(audio) else str(audio))
        try:
            check_name(item_id, "id")
            if item_id in seen:
                raise ValueError(f"id {item_id!r} is used by an earlier row")
            seen.add(item_id)
            for name in ("portrait", "audio"):
                value = getattr(item, name)
                if not value and name == "portrait":  # a re-voicing avatar's row; a portrait model refuses it
                    continue
                if not value:
                    raise ValueError(f"{name} is empty")
                p = Path(value).expanduser()
                p = p if p.is_absolute() else base / p
                if not p.is_file():
                    raise ValueError(f"{name} file {value!r} not found")
                setattr(item, name, str(p.resolve()))
            opts = (options or {}) | {k: row[k] for k in OPTION_COLUMNS if k in row and not _is_missing(row[k])}
            item.options = RenderOptions.model_validate(opts).model_dump(exclude_none=True)
        except ValidationError as e:
            item.error = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        except ValueError as e:
            item.error = str(e)
        items.append(item)
    return items


# what a killed run leaves in OUT: letstalk.media.write_video's `.ID.mp4.XXXX.part` (`.part.mp4` before),
# write_atomic's `.ID.mp4.part`
STALE_PARTS = ".*.mp4.*part*"


def remove_stale_parts(out_dir: Path) -> None:
    """Delete the temporaries of a killed run (a re-run's first step)."""
    for part in out_dir.glob(STALE_PARTS):
        part.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    part = path.with_name(f".{path.name}.part")
    part.write_bytes(data)
    part.rename(path)


def _record(item: Item, status: str, out: Path | None = None, result: dict | None = None,
            error: str | None = None, reused: bool = False) -> dict:
    result = result or {}
    seconds, options = result.get("seconds") or {}, result.get("options") or {}
    return {"row": item.row, "id": item.id, "portrait": item.portrait, "audio": item.audio, "status": status,
            "reused": reused, "error": error, "output": str(out) if out else None, "frames": result.get("frames"),
            "clips": result.get("clips"), "duration_s": result.get("duration_s"), "steps": options.get("steps"),
            "sampler": options.get("sampler"), "paste_back": options.get("paste_back"),
            "max_side": options.get("max_side"), "dtype": options.get("dtype"),
            "seconds_total": seconds.get("worker_total"), "seconds_denoise": seconds.get("denoise"),
            "seconds_decode": seconds.get("decode"), "finished_at": None if reused else time.time()}


def write_results(records: list[dict], out_dir: Path) -> Path:
    columns = {k: [r.get(k) for r in sorted(records, key=lambda r: r["row"])] for k in RESULT_FIELDS}
    schema = pa.schema([("row", pa.int64()), ("id", pa.string()), ("portrait", pa.string()),
                        ("audio", pa.string()), ("status", pa.string()), ("reused", pa.bool_()), ("error", pa.string()),
                        ("output", pa.string()), ("frames", pa.int64()), ("clips", pa.int64()),
                        ("duration_s", pa.float64()), ("steps", pa.int64()), ("sampler", pa.string()),
                        ("paste_back", pa.bool_()), ("max_side", pa.int64()), ("dtype", pa.string()),
                        ("seconds_total", pa.float64()),
                        ("seconds_denoise", pa.float64()), ("seconds_decode", pa.float64()),
                        ("finished_at", pa.float64())])
    path = out_dir / "results.parquet"
    part = out_dir / ".results.parquet.part"
    pq.write_table(pa.table(columns, schema=schema), part)
    part.rename(path)
    return path


# render(item, target) -> RenderWorker.render's result ({"status": "done", "video_path": target or None,
# "video": bytes or None, ...}) or {"status": "failed", "error": ...}
Render = Callable[[Item, Path], dict]


def run_batch(items: list[Item], out_dir: Path, render: Render | None, *, concurrency: int = 2,
              results_iter: Callable[[list[Item]], Iterable[tuple[Item, dict]]] | None = None,
              progress: bool = True) -> list[dict]:
    """Render the valid, not-yet-rendered items (after removing a killed run's temporaries from
    `out_dir`); returns one record per item (also in results.parquet).

    `render(item, target)` is called from `concurrency` threads; `results_iter(todo)` instead yields
    (item, result) pairs as a whole (the Ray Data path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(out_dir)
    records, todo = [], []
    for item in items:
        target = out_dir / f"{item.id}.mp4" if item.error is None else None
        if item.error is not None:
            records.append(_record(item, "failed", error=item.error))
        elif target.is_file():
            records.append(_record(item, "done", target, reused=True))
        else:
            todo.append(item)
    bar = tqdm(total=len(todo), desc="render", unit="video", disable=not progress)

    def finish(item: Item, result: dict) -> None:
        target = out_dir / f"{item.id}.mp4"
        if result.get("status") == "done":
            if result.get("video") is not None:  # rendered elsewhere: written here
                write_atomic(target, result["video"])
            records.append(_record(item, "done", target, result))
        else:
            records.append(_record(item, "failed", error=result.get("error") or "unknown error", result=result))
        bar.update(1)

    try:
        if results_iter is not None:
            for item, result in results_iter(todo):
                finish(item, result)
        elif todo:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                pending = {}
                queue = list(todo)
                while queue or pending:
                    while queue and len(pending) < concurrency:
                        item = queue.pop(0)
                        pending[pool.submit(render, item, out_dir / f"{item.id}.mp4")] = item
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        item = pending.pop(fut)
                        try:
                            result = fut.result()
                        except Exception as e:  # a crashed replica or similar: this row fails, the batch goes on
                            result = {"status": "failed", "error": f"render failed: {one_line(e, 300)}"}
                        finish(item, result)
    finally:
        bar.close()
        finished = {r["row"] for r in records}
        for item in todo:
            if item.row not in finished:
                records.append(_record(item, "failed", error="not rendered: the batch was interrupted"))
        write_results(records, out_dir)
    return sorted(records, key=lambda r: r["row"])


# ------------------------------------------------------------------ the two back ends


def serve_render(handle) -> Render:
    """Render through the Serve Renderer deployment (a DeploymentHandle)."""
    here = node_id()  # a replica on this node writes the mp4 straight into the output folder

    def render(item: Item, target: Path) -> dict:
        portrait = Path(item.portrait).read_bytes() if item.portrait else None  # none: a re-voicing avatar's row
        return handle.render.remote(portrait, Path(item.audio).read_bytes(), item.options, str(target), here).result()

    return render


class BatchActor:
    """Ray Data actor: one RenderWorker per actor; rows in, results out (the mp4 written into the
    output folder when it is on the actor's machine, else its bytes)."""

    def __init__(self, bundle_dir: str, out_dir: str, out_node: str, defaults: dict | None = None, inference: dict | None = None):
        from .render import RenderDefaults

        self.out_dir, self.out_node = Path(out_dir), out_node
        self.worker = RenderWorker(bundle_dir, defaults=RenderDefaults.model_validate(defaults or {}),
                                   inference=inference)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"row": [], "result": []}
        for row, item_id, portrait, audio, options in zip(batch["row"], batch["id"], batch["portrait"], batch["audio"],
                                                          batch["options"]):
            try:
                result = self.worker.render(Path(portrait).read_bytes() if portrait else None, Path(audio).read_bytes(),
                                            json.loads(options),
                                            out=local_target(self.out_dir / f"{item_id}.mp4", self.out_node))
            except (ValueError, ValidationError, OSError) as e:
                result = {"status": "failed", "error": one_line(e)}
            out["row"].append(int(row))
            out["result"].append(result)
        return {"row": out["row"], "result": [json.dumps({k: v for k, v in r.items() if k != "video"})
                                              for r in out["result"]],
                "video": [r.get("video") or b"" for r in out["result"]]}


def data_results(bundle_dir: str, out_dir: Path, *, actors: int, use_gpu: bool, cpus_per_actor: float,
                 defaults: dict | None = None, inference: dict | None = None
                 ) -> Callable[[list[Item]], Iterable[tuple[Item, dict]]]:
    """The standalone back end: a Ray Data actor pool over the rows; `inference`: the actors'
    letstalk.accel.InferenceOptions (dict)."""
    import ray

    def results(todo: list[Item]) -> Iterable[tuple[Item, dict]]:
        if not todo:
            return
        by_row = {item.row: item for item in todo}
        ds = ray.data.from_items([{"row": i.row, "id": i.id, "portrait": i.portrait, "audio": i.audio,
                                   "options": json.dumps(i.options)} for i in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(BatchActor, fn_constructor_kwargs={"bundle_dir": bundle_dir, "out_dir": str(out_dir), "out_node": node_id(),
                                                            "defaults": defaults, "inference": inference},
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                            num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor)
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            if result["status"] == "done" and result.get("video_path") is None:
                result["video"] = row["video"]
            yield by_row[int(row["row"])], result

    return results
