"""Reading the preprocessed clip shards (layout: letstalk.clips; written by letstalk_platform.preprocess).

Two readers:
- `load_clips(path, split)`: a ray.data.Dataset of one split, for bulk work (evaluation, inspection).
- `ClipTable` + `epoch_batches` + `BatchLoader`: what training reads. The order of the clips is a
  pure function of (seed, epoch, world size), every clip is read by its index (one parquet row
  group), so a resumed run starts at (epoch, batch) without reading or decoding what came before,
  and sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from letstalk.artifacts import SPLITS, TENSOR_COLUMNS, InputRecord, ShardManifest


def _done_inputs(root: Path, split: str) -> list[InputRecord]:
    """The manifest's finished inputs of one split (validated: manifest present and current, split known)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    entries = ShardManifest.load(root).done(split)
    if not entries:
        raise ValueError(f"{root}: no {split} clips (see manifest.json counts)")
    return entries


def load_clips(path: str | os.PathLike, split: Literal["train", "eval"]):
    """The clips of one split as a ray.data.Dataset (one row per clip, tensor columns as numpy/torch).

    Only shards the manifest lists as ok are read, so a re-run in progress never exposes a
    partial dataset.
    """
    import ray

    root = Path(path)
    return ray.data.read_parquet([str(root / e.shard) for e in _done_inputs(root, split)])


class ClipTable:
    """Random access to the clips of one split: global index -> the clip's columns.

    Clip i is row (i - offset[k]) of shard k, shards in manifest order (sorted by input path), so
    the numbering is the same on every rank and every node. A read touches only the parquet row
    groups that hold the requested rows (preprocessing writes one clip per row group).
    """

    def __init__(self, path: str | os.PathLike, split: Literal["train", "eval"], columns: Sequence[str],
                 open_files: int = 64):
        root = Path(path)
        entries = _done_inputs(root, split)
        self.files = [str(root / e.shard) for e in entries]
        self.video_ids = [e.video_id for e in entries]
        counts = np.asarray([e.clips for e in entries], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # clip index where shard k starts
        self.columns = list(columns)
        self._open: OrderedDict[int, tuple[Any, np.ndarray]] = OrderedDict()  # shard -> (ParquetFile, group starts)
        self._max_open = open_files
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global clip index -> (shard number, row in that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"clip {index} out of range (0..{len(self) - 1})")
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return k, int(index - self.offsets[k])

    def video_of(self, index: int) -> str:
        return self.video_ids[self.locate(index)[0]]

    def _file(self, k: int) -> tuple[Any, np.ndarray]:
        import pyarrow.parquet as pq

        with self._lock:
            if k in self._open:
                self._open.move_to_end(k)
                return self._open[k]
            pf = pq.ParquetFile(self.files[k])
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._open[k] = (pf, np.concatenate([[0], np.cumsum(sizes)]))
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)
            return self._open[k]

    def read(self, indices: Sequence[int]) -> dict[str, Any]:
        """The clips at `indices`, in that order: tensor columns stacked into numpy arrays
        (N, ...), other columns as numpy arrays of N values."""
        import pyarrow as pa

        wanted: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (shard, row group) -> [(position, row)]
        for pos, index in enumerate(indices):
            k, row = self.locate(int(index))
            starts = self._file(k)[1]
            g = int(np.searchsorted(starts, row, side="right") - 1)
            wanted.setdefault((k, g), []).append((pos, row - int(starts[g])))
        parts, order = [], []
        for (k, g), rows in wanted.items():
            table = self._file(k)[0].read_row_group(g, columns=self.columns)
            parts.append(table.take(pa.array([r for _, r in rows])))
            order.extend(pos for pos, _ in rows)
        table = pa.concat_tables(parts).take(pa.array(np.argsort(order)))
        out: dict[str, Any] = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            if name in TENSOR_COLUMNS:  # writable: torch.from_numpy warns on Arrow's read-only buffers
                array = column.to_numpy_ndarray()
                out[name] = array if array.flags.writeable else array.copy()
            else:
                out[name] = column.to_numpy(zero_copy_only=False)
        return out


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global order of n clips in one epoch: a permutation seeded by (seed, epoch) (identity
    without shuffle). A pure function: every rank, node and restart computes the same."""
    if not shuffle:
        return np.arange(n)
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  shuffle: bool = True) -> np.ndarray:
    """Clip indices of rank `rank`'s batches in one epoch: (batches, batch_size).

    Rank r takes every world-th clip of the epoch's order from position r, so a step's global
    batch is world × batch_size consecutive clips of the permutation, drawn from many videos.
    Every rank gets the same number of batches (the tail that does not fill a step is dropped).
    """
    per_step = batch_size * world
    if n < per_step:
        raise ValueError(f"{n} training clips are fewer than one step's batch ({world} workers × {batch_size})")
    steps = n // per_step
    mine = epoch_order(n, seed, epoch, shuffle)[: steps * per_step][rank::world]
    return mine.reshape(steps, batch_size)


class BatchLoader:
    """Rank `rank`'s batches from data position (epoch, batch) on, read ahead by a thread.

    Yields (epoch, batch index within the epoch, {column: numpy array}); epochs follow one another
    without end (the caller stops). Nothing before the start position is read.
    """

    def __init__(self, table: ClipTable, batch_size: int, seed: int, rank: int, world: int, shuffle: bool = True,
                 start: tuple[int, int] = (0, 0), prefetch: int = 2):
        self.table, self.batch_size, self.seed = table, batch_size, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.start, self.prefetch = start, max(1, prefetch)
        self.batches_per_epoch = len(epoch_batches(len(table), batch_size, seed, 0, rank, world, shuffle))

    def positions(self) -> Iterator[tuple[int, int, np.ndarray]]:
        epoch, first = self.start
        while True:
            batches = epoch_batches(len(self.table), self.batch_size, self.seed, epoch, self.rank, self.world,
                                    self.shuffle)
            for b in range(first, len(batches)):
                yield epoch, b, batches[b]
            epoch, first = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for epoch, b, indices in self.positions():
                    item = (epoch, b, self.table.read(indices))
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # surfaces in the training loop, not in a silent thread
                q.put(e)

        thread = threading.Thread(target=produce, name="letstalk-batch-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
