"""Reading the preprocessed clip shards (layout: letstalk.clips; written by letstalk_platform.preprocess)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import ray

from letstalk.clips import SCHEMA_VERSION

from .preprocess import load_manifest


def load_clips(path: str | os.PathLike, split: Literal["train", "eval"]) -> ray.data.Dataset:
    """The clips of one split as a ray.data.Dataset (one row per clip, tensor columns as numpy/torch).

    Only shards the manifest lists as ok are read, so a re-run in progress never exposes a
    partial dataset.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    root = Path(path)
    manifest = load_manifest(root)
    if manifest is None:
        raise ValueError(f"{root} has no manifest.json: run jobs/preprocess.py first")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{root}: shard schema version {manifest.get('schema_version')} != {SCHEMA_VERSION}; "
                         "re-run preprocessing")
    files = [str(root / e["shard"]) for e in manifest["inputs"] if e["status"] == "ok" and e["split"] == split]
    if not files:
        raise ValueError(f"{root}: no {split} clips (see manifest.json counts)")
    return ray.data.read_parquet(files)
