"""Merge the denoiser's forward passes of concurrent renders into one batch (pure torch).

Several renders run at once in threads of one Serve replica, each calling the transformer once
per denoising step with a batch of one clip. On a GPU, one forward pass over B clips costs far
less than B passes over one, so `ClipBatcher` collects the calls that arrive within a short
window, concatenates those whose shapes match along the batch axis (each keeps its own timestep,
portrait, audio and motion frames), runs one forward pass and hands each caller its rows back.

There is no batching thread: the first caller of a group waits up to `wait_ms` for others (no
longer than it takes every render in flight to arrive), then runs the group in its own thread,
with its own autocast / no_grad state, which all callers of one pipeline share.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

Forward = Callable[..., torch.Tensor]  # forward(x, t, portrait, audio, motion, guidance=[, cond=]) -> (B, F, C', H, W)


@dataclass
class _Call:
    args: tuple  # x (b, F, C, H, W), t (b,), portrait (b, C, H, W), audio (b, F, ...) | None, motion (b, M, ...) | None,
    #              cond (b, F, C', H, W) | None
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass
class _Group:
    calls: list[_Call] = field(default_factory=list)
    rows: int = 0


class ClipBatcher:
    """Thread-safe: `batcher(x, t, portrait, audio, motion, guidance=g)` returns what
    `forward(x, t, portrait, audio, motion, guidance=g)` would, computed in a merged batch.

    Calls merge when their clip length F, motion-frame count M, guidance, dtypes and device match
    (the last, shorter clip of a video merges only with clips of its own length).

    Args:
        forward: the batched function, e.g. `LetsTalkTransformer.forward_with_guidance`.
        max_batch: most rows (clips) in one merged call; a group that reaches it runs at once.
        wait_ms: how long the first call of a group waits for others to join.

    `session()` marks a render in flight (the pipeline enters it around each clip's denoising):
    a group stops waiting as soon as every render in flight has a call in it, so a lone render
    never waits (with no session open, a group waits the whole `wait_ms`). `forwards` and
    `calls` count merged forward passes and the calls they served.
    """

    def __init__(self, forward: Forward, max_batch: int = 4, wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0 <= wait_ms <= 1000:
            raise ValueError(f"wait_ms must be in [0, 1000], got {wait_ms}")
        self.forward, self.max_batch, self.wait_s = forward, max_batch, wait_ms / 1000
        self._cond = threading.Condition()
        self._pending: dict[tuple, _Group] = {}
        self._sessions = 0
        self.forwards = 0
        self.calls = 0

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with self._cond:
            self._sessions += 1
        try:
            yield
        finally:
            with self._cond:
                self._sessions -= 1
                self._cond.notify_all()  # a waiting group may now hold every render in flight

    @staticmethod
    def _key(x, t, portrait, audio, motion, cond, guidance) -> tuple:
        def sig(v):
            return None if v is None else (tuple(v.shape[1:]), v.dtype)
        return (sig(x), sig(t), sig(portrait), sig(audio), sig(motion), sig(cond), x.device, float(guidance))

    def _ready(self, group: _Group) -> bool:
        full = group.rows >= self.max_batch
        return full or (self._sessions > 0 and len(group.calls) >= self._sessions)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, portrait: torch.Tensor, audio: torch.Tensor | None,
                 motion: torch.Tensor | None = None, *, guidance: float = 1.0,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        if motion is not None and motion.shape[1] == 0:
            motion = None  # no motion frames: the same forward pass as None, and it merges with it
        key = self._key(x, t, portrait, audio, motion, cond, guidance)
        call = _Call((x, t, portrait, audio, motion, cond), x.shape[0])
        run: _Group | None = None
        with self._cond:
            self.calls += 1
            group = self._pending.get(key)
            leader = group is None
            if leader:
                group = self._pending[key] = _Group()
            group.calls.append(call)
            group.rows += call.rows
            if self._ready(group):
                del self._pending[key]
                run = group
                self._cond.notify_all()  # the leader stops waiting: its group is taken
            elif leader:
                deadline = time.monotonic() + self.wait_s
                while self._pending.get(key) is group and not self._ready(group):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._pending.get(key) is group:
                    del self._pending[key]
                    run = group
        if run is not None:
            self._run(run, guidance)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _run(self, group: _Group, guidance: float) -> None:
        calls = group.calls
        try:
            if len(calls) == 1:
                merged = list(calls[0].args)
            else:
                # concatenate along the batch axis: x (ΣB, F, C, H, W), t (ΣB,), portrait (ΣB, C, H, W), ...
                merged = [None if a[0] is None else torch.cat(a) for a in zip(*(c.args for c in calls))]
            cond = merged.pop()  # given only to a forward of a model with condition channels (re-voicing)
            out = self.forward(*merged, guidance=guidance, **({} if cond is None else {"cond": cond}))
            if len(calls) == 1:
                parts = [out]
            else:  # (ΣB, F, C', H, W)
                parts = out.split([c.rows for c in calls])
            with self._cond:
                self.forwards += 1
            for c, part in zip(calls, parts):
                c.result = part
        except BaseException as e:  # noqa: BLE001 - every caller of the group gets the error
            for c in calls:
                c.error = e
        finally:
            for c in calls:
                c.done.set()
