"""Inference speed switches (issue 9), each off by default and each switchable on its own.

    pipe.set_inference(InferenceOptions(dtype="bf16", sdpa_backend="flash", compile="regional",
                                        overlap_decode=True, batch_clips=True))

- dtype: autocast of the denoiser's forward passes (bf16 or fp16 on CUDA; bf16 on CPU too). The
  sampler's arithmetic stays fp32 (`GaussianDiffusion.sample` casts the output) and so does the
  codec: SD's VAE overflows in fp16, so a half VAE is a load-time choice (`from_pretrained(dtype=)`).
- sdpa_backend: which scaled-dot-product-attention kernels the transformer may use
  (torch.nn.attention.sdpa_kernel); "auto" leaves torch's choice alone.
- compile: torch.compile of each LetsTalkBlock ("regional": one small graph, compiled once and
  reused by every block of the same shape, and no graph over the input checks) or of the whole
  transformer ("full").
- overlap_decode: the codec decodes clip k in a background thread (on CUDA: its own stream) while
  clip k+1 denoises; clips come out in order, and an error in either propagates. For GPUs: on a
  CPU whose cores the denoiser already fills, the two thread teams contend (measured ×0.50-0.77,
  docs/benchmarks.md).
- batch_clips: forward passes of concurrent renders on one pipeline (threads of one Serve
  replica) are merged into one batch (`letstalk.batching.ClipBatcher`).

Defaults (fp32, auto, none, False, False) leave the pipeline exactly as it was: no context is
entered, no thread started, and the frames are bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Literal, TypeVar, get_args

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Dtype = Literal["fp32", "bf16", "fp16"]
SdpaBackend = Literal["auto", "flash", "efficient", "math"]
CompileMode = Literal["none", "regional", "full"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH}
T = TypeVar("T")


@dataclass(frozen=True)
class InferenceOptions:
    """How a LetsTalkPipeline runs its networks; validated on construction (one-line ValueError).

    Args:
        dtype: "fp32" (no autocast), "bf16" (CUDA or CPU) or "fp16" (CUDA only) autocast of the denoiser.
        sdpa_backend: "auto" (torch picks), "flash", "efficient" (memory-efficient) or "math".
        compile: "none", "regional" (torch.compile each transformer block) or "full" (the transformer).
        compile_backend: torch.compile backend ("inductor"; "aot_eager" checks the tracing only).
        overlap_decode: decode clip k in a background thread while clip k+1 denoises.
        batch_clips: merge forward passes of concurrent renders on this pipeline into one batch.
        max_batch: most clips (batch rows) in one merged forward pass.
        batch_wait_ms: how long the first call waits for others to join its batch.
    """

    dtype: Dtype = "fp32"
    sdpa_backend: SdpaBackend = "auto"
    compile: CompileMode = "none"
    compile_backend: str = "inductor"
    overlap_decode: bool = False
    batch_clips: bool = False
    max_batch: int = 4
    batch_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        for name, kind in (("dtype", Dtype), ("sdpa_backend", SdpaBackend), ("compile", CompileMode)):
            value = getattr(self, name)
            if value not in get_args(kind):
                raise ValueError(f"{name} must be one of {list(get_args(kind))}, got {value!r}")
        for name in ("overlap_decode", "batch_clips"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(f"compile_backend must be a torch.compile backend name, got {self.compile_backend!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if isinstance(self.batch_wait_ms, bool) or not isinstance(self.batch_wait_ms, (int, float)) \
                or not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be a number of milliseconds in [0, 1000], got {self.batch_wait_ms!r}")

    @classmethod
    def from_dict(cls, data: dict | None) -> "InferenceOptions":
        """From a plain dict (YAML, Serve args); unknown keys are a one-line ValueError."""
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown inference option(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_default(self) -> bool:
        return self == InferenceOptions()


# ------------------------------------------------------------------------------------ autocast


def autocast(dtype: Dtype, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context for `dtype` on `device` (a no-op for fp32); fp16 needs CUDA."""
    device = torch.device(device)
    if dtype == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=DTYPES[dtype])
    if device.type == "cpu" and dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"dtype {dtype!r} autocast needs a CUDA device (on {device.type}: fp32 or bf16)")


# ------------------------------------------------------------------------------------ SDPA kernels


class _SdpaScope:
    """sdpa_kernel sets process-wide flags (torch._C._set_sdp_use_*), not thread-local ones: two
    render threads entering and leaving it at different times would leave each other (and the
    process) with the wrong flags. This scope enters it once for all threads that ask for the same
    backend and leaves it when the last one is done; a thread asking for another backend waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._backend: str | None = None
        self._ctx: contextlib.AbstractContextManager | None = None

    @contextlib.contextmanager
    def use(self, backend: str) -> Iterator[None]:
        with self._cond:
            while self._users and self._backend != backend:
                self._cond.wait()
            if self._users == 0:
                self._ctx = sdpa_kernel(SDPA_BACKENDS[backend])
                self._ctx.__enter__()
                self._backend = backend
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    ctx, self._ctx, self._backend = self._ctx, None, None
                    ctx.__exit__(None, None, None)
                    self._cond.notify_all()


_SDPA = _SdpaScope()


def sdpa_backend(backend: SdpaBackend) -> contextlib.AbstractContextManager:
    """Restrict scaled_dot_product_attention to one kernel family; "auto" changes nothing."""
    if backend == "auto":
        return contextlib.nullcontext()
    return _SDPA.use(backend)


def inference_scope(options: InferenceOptions, device: torch.device | str) -> contextlib.ExitStack:
    """`options`' autocast and SDPA kernel family on `device`, entered around each forward pass."""
    stack = contextlib.ExitStack()
    stack.enter_context(autocast(options.dtype, device))
    stack.enter_context(sdpa_backend(options.sdpa_backend))
    return stack


def check_sdpa_backend(backend: SdpaBackend, device: torch.device | str, dtype: Dtype, head_dim: int) -> None:
    """Run one small attention under `backend` on `device`; a one-line ValueError if no kernel of
    that family takes these inputs (e.g. flash attention wants CUDA and fp16/bf16, or the CPU build)."""
    if backend == "auto":
        return
    device = torch.device(device)
    q = torch.randn(1, 2, 8, head_dim, device=device)
    try:
        with torch.no_grad(), autocast(dtype, device), sdpa_backend(backend):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"sdpa_backend {backend!r} has no kernel for {dtype} attention on {device.type} "
                         f"(head dim {head_dim}): {reason}") from None


# ------------------------------------------------------------------------------------ torch.compile


def compile_transformer(transformer: nn.Module, mode: CompileMode, backend: str = "inductor") -> None:
    """Compile in place with nn.Module.compile (parameters and state-dict keys are unchanged).

    "regional" compiles each block: one small graph that every block of the same shapes reuses,
    compiled in seconds, and the input checks and Python branching of the model's forward stay
    eager. "full" compiles the transformer's forward (a shape change recompiles it). "none"
    undoes either.
    """
    modules = [transformer, *transformer.blocks]
    for module in modules:
        # nn.Module.compile stores the compiled __call__ here; None is eager again (torch has no
        # public "uncompile")
        module._compiled_call_impl = None
    if mode == "regional":
        for block in transformer.blocks:
            block.compile(backend=backend)
    elif mode == "full":
        transformer.compile(backend=backend)


# ------------------------------------------------------------------------------------ threads


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, cut to the cgroup's CPU quota (a container
    limited to 2 CPUs on a 64-core host sees os.cpu_count() = 64, and torch's default thread count
    follows the host)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_cpu_quota() -> int | None:
    """The cgroup's CPU quota rounded up to whole CPUs (v2 cpu.max "quota period", v1 cfs_quota_us and
    cfs_period_us), or None: no quota, or no cgroup file."""
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
    else:
        quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    try:
        if quota in (None, "max", "-1") or int(period) <= 0:
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (TypeError, ValueError):
        return None


def idle_cpus(sample_s: float = 0.25) -> float | None:
    """How many of this process's CPUs sat idle over the next `sample_s` seconds (/proc/stat), or None
    where that cannot be read (not Linux)."""
    try:
        mine = os.sched_getaffinity(0)
    except AttributeError:
        return None

    def times() -> dict[int, tuple[int, int]]:  # cpu -> (idle + iowait, total) jiffies
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *values = line.split()
                    ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
                    out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
        return out

    try:
        before = times()
        time.sleep(sample_s)
        after = times()
    except (OSError, ValueError, IndexError):
        return None
    idle = 0.0
    for cpu in mine & before.keys() & after.keys():
        total = after[cpu][1] - before[cpu][1]
        idle += (after[cpu][0] - before[cpu][0]) / total if total > 0 else 1.0
    return idle


def auto_threads() -> int:
    """The torch thread count for a render: the usable CPUs that are idle now, at least 1.

    More threads than idle cores is slow on CPU: each parallel region waits for its slowest thread,
    and a thread that shares its core with another process is the slowest. Measured (bench/threads.py,
    2 cores, the demo model, 2 s of audio): with one core busy, 2 threads took 2.1× as long as 1
    (20.2 s vs 9.5 s); on the idle machine 2 threads took 0.63× as long as 1, and 4 or 8 threads
    1.6-2.0× as long as 2."""
    usable = usable_cpus()
    idle = idle_cpus()
    return usable if idle is None else max(1, min(usable, round(idle)))


def set_threads(threads: int | None = None) -> int:
    """torch's intra-op threads: `threads`, or auto_threads(); returns the count set."""
    n = auto_threads() if threads is None else threads
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def torch_thread_pool(max_workers: int, thread_name_prefix: str = "") -> ThreadPoolExecutor:
    """A ThreadPoolExecutor whose threads use the caller's torch intra-op thread count.

    torch.set_num_threads does not reach threads started later: their OpenMP teams keep the default
    size (measured: 4 such render threads on 2 cores ran 4x slower).
    """
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix,
                              initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))


# ------------------------------------------------------------------------------------ decode overlap


def overlapped(clips: Iterator[torch.Tensor], decode: Callable[[torch.Tensor], T]) -> Iterator[T]:
    """Yield decode(clip) for each clip, in order, decoding clip k in one background thread while
    the caller's iterator produces clip k+1.

    On CUDA the decode runs on its own stream, ordered after the work that produced the clip (an
    event recorded when the clip arrives). An error raised by `clips` or by `decode` propagates to
    the caller; closing this generator early waits for the decode in flight and drops its result.
    """
    streams: dict[torch.device, torch.cuda.Stream] = {}

    def submit(pool: ThreadPoolExecutor, clip: torch.Tensor) -> Future:
        if not clip.is_cuda:
            return pool.submit(decode, clip)
        stream = streams.setdefault(clip.device, torch.cuda.Stream(clip.device))
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(clip.device))

        def on_side_stream() -> T:
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                clip.record_stream(stream)  # the allocator must not hand its memory out before we are done
                out = decode(clip)
            stream.synchronize()
            return out

        return pool.submit(on_side_stream)

    with torch_thread_pool(1, "letstalk-decode") as pool:
        pending: Future | None = None
        try:
            for clip in clips:
                nxt = submit(pool, clip)
                if pending is not None:
                    yield pending.result()
                pending = nxt
            if pending is not None:
                done, pending = pending, None
                yield done.result()
        finally:
            if pending is not None:  # the consumer stopped or the producer raised: let the decode finish
                pending.cancel()
                try:
                    pending.result()
                except BaseException:  # noqa: BLE001 - the error that brought us here wins
                    pass
