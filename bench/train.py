"""Training benchmark (prints figures measured in one run; not a test).

    python bench/train.py [--preset demo] [--steps 200] [--skip-throughput] [--skip-memory]

1. Throughput: samples/s of Ray Train + DeepSpeed ZeRO-2 (2 CPU workers, local Ray) vs a plain
   single-process PyTorch loop (AdamW, same model, same global batch, same shards, same cores),
   and the peak RSS of a Ray Train worker. Where the difference goes: the same plain loop on one
   thread with one worker's half of the batch (what each worker computes: twice its rate is the
   ideal for 2 workers), rank 0's data wait, and a gloo all-reduce of the gradients timed alone.
2. Memory on paper for LetsTalk-L: parameter/optimizer/EMA state per GPU on 8 GPUs under ZeRO-2
   and ZeRO-3, plus activations per clip *measured* here by summing the bytes autograd saves for
   one L block at 16 frames (with and without activation checkpointing), scaled to bf16.
3. Time for 300k steps of L at the paper's batch (16 clips) on 8×A800 at an assumed MFU, from
   the FLOPs of one forward counted on the meta device.
4. Training switches (`--switches`, plain PyTorch, one process, ratios within one run): a training
   step (forward + backward) of the S preset in fp32, bf16 autocast and with activation
   checkpointing (time and the bytes autograd keeps), and one AdamW step over S's parameters with
   torch's per-tensor loop, multi-tensor foreach and fused kernels (TrainConfig optim.kernel).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from letstalk import LetsTalkTransformer, count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import timed  # noqa: E402  (bench/model.py: median of `repeats` after a warm-up)
from letstalk.config import LetsTalkConfig

A800_BF16_PEAK = 312e12  # dense bf16 FLOP/s (A100/A800 class)


def make_shards(root: Path, preset: str) -> Path:
    """6 drawn talking videos tokenized with the bundle the preset trains on (letstalk/models/demo's
    space-to-depth codec for `demo`, a random tiny bundle otherwise)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import talking_video

    from letstalk.cli import SHIPPED
    from letstalk.pipeline import LetsTalkPipeline
    from letstalk_platform.preprocess import PreprocessConfig, run_preprocess

    if preset == "demo":
        bundle = SHIPPED
    else:
        bundle = LetsTalkPipeline.init_tiny().save_pretrained(root / "bundle")
    raw = root / "raw"
    raw.mkdir()
    for i in range(6):
        talking_video(raw / f"v{i}.mp4", 100, seed=i, identity=f"id{i}")
    run_preprocess(PreprocessConfig(input=str(raw), output=str(root / "shards"), model=str(bundle), stride=2,
                                    eval_fraction=0.0, faces={"detector": "haar", "crop": "fixed"}))
    return root / "shards"


def shard_arch(shards: Path, preset: str) -> dict:
    """The architecture run_training builds for these shards."""
    from letstalk.artifacts import ShardManifest
    from letstalk_platform.train import ModelSection, architecture

    return architecture(ModelSection(preset=preset), ShardManifest.load(shards)).to_dict()


def plain_loop(shards: Path, steps: int, batch: int, preset: str, threads: int) -> float:
    """samples/s of a single-process loop over the same shards (all in memory, no Ray, no DeepSpeed)."""
    import pyarrow.parquet as pq

    from letstalk.diffusion import GaussianDiffusion
    from letstalk.training import Augment, loss_terms, prepare_batch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    tables = [pq.read_table(p) for p in sorted((shards / "train").glob("*.parquet"))]
    cols = {k: np.concatenate([t.column(k).combine_chunks().to_numpy_ndarray() for t in tables])
            for k in ("latents", "audio", "motion", "refs")}
    n = len(cols["latents"])
    torch.manual_seed(0)
    model = LetsTalkTransformer(**shard_arch(shards, preset))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0, fused=True)
    diffusion, aug, g = GaussianDiffusion(), Augment(), torch.Generator().manual_seed(0)
    warmup = min(10, steps // 4)
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        idx = np.random.default_rng(step).choice(n, batch, replace=False)
        inputs = prepare_batch({k: torch.from_numpy(v[idx]) for k, v in cols.items()}, aug, 5, g)
        loss = loss_terms(model, diffusion, inputs, g)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    torch.set_num_threads(before)
    return (steps - warmup) * batch / (time.perf_counter() - t0)


def allreduce_seconds(numel: int, repeats: int = 20) -> float:
    """Median time of a gloo all-reduce of `numel` fp32 values between 2 local processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_allreduce_worker, args=(numel, repeats, str(Path(d) / "rdv"), str(Path(d) / "out")), nprocs=2)
        return float((Path(d) / "out").read_text())


def _allreduce_worker(rank: int, numel: int, repeats: int, rdv: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    x = torch.randn(numel)
    times = []
    for _ in range(repeats + 3):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(str(float(np.median(times[3:]))))
    dist.destroy_process_group()


def ray_train(shards: Path, root: Path, steps: int, batch: int, preset: str) -> tuple[float, float, float]:
    from mlflow.tracking import MlflowClient

    from letstalk_platform.runtime import init_ray
    from letstalk_platform.train import TrainConfig, run_training

    init_ray(num_cpus=2)
    uri = f"sqlite:///{root}/m.db"
    log_every = max(5, steps // 20)
    cfg = TrainConfig(model={"preset": preset}, data={"path": str(shards), "batch_size": batch // 2},
                      optim={"lr": 1e-3}, scaling={"num_workers": 2, "cpus_per_worker": 1},
                      tracking={"storage": str(root / "runs"), "mlflow_uri": uri, "experiment": "bench",
                                "register_name": None},
                      steps=steps, checkpoint_every=steps, log_every=log_every, sample_clips=0)
    summary = run_training(cfg)
    client = MlflowClient(uri)
    # steady state: the first interval holds the start-up, the last one the checkpoint
    keep = lambda m: log_every < m.step < steps  # noqa: E731
    rates = [m.value for m in client.get_metric_history(summary["run_id"], "samples_per_s") if keep(m)]
    rss = max(m.value for m in client.get_metric_history(summary["run_id"], "peak_rss_mb"))
    wait = [m.value for m in client.get_metric_history(summary["run_id"], "data_wait_frac") if keep(m)]
    # every interval holds the same number of samples: total samples / total time = harmonic mean
    return float(len(rates) / np.sum(1.0 / np.asarray(rates))), rss, float(np.mean(wait))


def saved_bytes_per_block(cfg: LetsTalkConfig, checkpointing: bool) -> int:
    """Bytes autograd keeps for one block's backward, for one clip (fp32)."""
    model = LetsTalkTransformer(**cfg.to_dict())
    block = model.blocks[0]
    d, p, f = cfg.hidden_size, cfg.tokens_per_frame, cfg.num_frames
    x = torch.randn(1, f, p, d, requires_grad=True)
    side = torch.randn(1, f, p, d, requires_grad=True)
    motion = torch.randn(1, cfg.num_motion_frames, p, d, requires_grad=True)
    audio = torch.randn(1, f, cfg.audio_tokens, cfg.audio_token_dim)
    c = torch.randn(1, d)
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and t.data_ptr() not in (x.data_ptr(), side.data_ptr(), motion.data_ptr()):
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if checkpointing:
            from torch.utils.checkpoint import checkpoint

            checkpoint(block, x, c, motion, side, audio, None, use_reentrant=False)
        else:
            block(x, c, motion, side, audio, None)
    return total


def memory_on_paper(per_gpu_clips: int = 2, gpus: int = 8) -> None:
    cfg = LetsTalkConfig.from_name("L")
    with torch.device("meta"):
        n = count_parameters(LetsTalkTransformer.from_preset("L"))["total"]
    gb = 1024**3
    full = {"bf16 weights": 2 * n, "bf16 grads": 2 * n, "fp32 master + Adam m, v": 12 * n}
    ema = 4 * n
    z2 = full["bf16 weights"] + (full["bf16 grads"] + full["fp32 master + Adam m, v"]) / gpus + ema
    z3 = (sum(full.values()) + ema) / gpus
    plain = saved_bytes_per_block(cfg, False)
    ckpt = saved_bytes_per_block(cfg, True)
    act = plain / 2 * cfg.depth  # bf16 halves fp32 activations
    act_ckpt = ckpt / 2 * cfg.depth + plain / 2  # block inputs kept + one block recomputed at a time
    print(f"L: {n / 1e6:.1f}M parameters (with audio projection), {gpus} GPUs, {per_gpu_clips} clips per GPU "
          f"(paper: batch 10-16)")
    print(f"  states per GPU: ZeRO-2 {z2 / gb:.2f} GB (weights full, grads+optimizer sharded, EMA full), "
          f"ZeRO-3 {z3 / gb:.2f} GB (all sharded, EMA sharded)")
    print(f"  activations per clip, measured on one block ×{cfg.depth}: {act / gb:.1f} GB bf16; "
          f"with activation checkpointing {act_ckpt / gb:.2f} GB")
    for name, states in (("ZeRO-2", z2), ("ZeRO-3", z3)):
        print(f"  {name}: {(states + per_gpu_clips * act) / gb:.1f} GB per GPU without checkpointing, "
              f"{(states + per_gpu_clips * act_ckpt) / gb:.1f} GB with (of 80 GB)")


def time_on_paper(steps: int = 300_000, batch: int = 16, gpus: int = 8, mfu: float = 0.4) -> None:
    cfg = LetsTalkConfig.from_name("L")
    with torch.device("meta"):
        model = LetsTalkTransformer(**cfg.to_dict())
        x = torch.randn(1, 16, 4, 32, 32)
        args = (x, torch.zeros(1, dtype=torch.long), torch.randn(1, 4, 32, 32),
                torch.randn(1, 16, 5, 12, 768), torch.randn(1, 2, 4, 32, 32))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(*args)  # math backend: its matmuls are visible to the counter
    fwd = counter.get_total_flops()
    per_step = 3 * fwd * batch  # forward + backward ≈ 3× forward (4× with activation checkpointing)
    seconds = per_step / (gpus * A800_BF16_PEAK * mfu)
    print(f"L forward: {fwd / 1e12:.2f} TFLOP per clip; a training step of {batch} clips: "
          f"{per_step / 1e12:.1f} TFLOP (3x forward)")
    print(f"  at {mfu:.0%} MFU on {gpus}×A800 (bf16 peak {A800_BF16_PEAK / 1e12:.0f} TFLOP/s): {seconds:.3f} s/step, "
          f"{steps:,} steps in {steps * seconds / 3600:.1f} h ({steps * seconds * 4 / 3 / 3600:.1f} h with "
          f"activation checkpointing)")


def training_switches(preset: str, frames: int, repeats: int) -> None:
    """Forward + backward of one clip under each switch, and one AdamW step per implementation."""
    from letstalk.diffusion import GaussianDiffusion
    from letstalk.training import loss_terms

    cfg = LetsTalkConfig.from_name(preset, num_frames=frames)
    torch.manual_seed(0)
    model = LetsTalkTransformer(**cfg.to_dict())
    s, c, m = cfg.input_size, cfg.in_channels, cfg.num_motion_frames
    inputs = {"x0": torch.randn(1, frames, c, s, s), "portrait": torch.randn(1, c, s, s),
              "audio": torch.randn(1, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim),
              "motion": torch.randn(1, m, c, s, s)}
    diffusion = GaussianDiffusion(learn_sigma=cfg.learn_sigma)
    print(f"training switches: {preset}, {count_parameters(model)['total'] / 1e6:.1f}M parameters, 1 clip of "
          f"{frames} frames at {s}×{s} latents, {torch.get_num_threads()} threads, median of {repeats}")

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step(bf16: bool) -> int:
        """One training step; returns the bytes autograd keeps for the backward (each storage once,
        the fp32 weights not counted)."""
        saved, seen = 0, set(weights)

        def pack(t):
            nonlocal saved
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                saved += t.untyped_storage().nbytes()
            return t

        model.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_terms(model, diffusion, inputs, g)["loss"]
        loss.backward()
        return saved

    rows = []
    for name, ckpt, bf16 in (("fp32", False, False), ("bf16 autocast", False, True),
                             ("fp32 + activation checkpointing", True, False),
                             ("bf16 + activation checkpointing", True, True)):
        model.enable_gradient_checkpointing() if ckpt else model.disable_gradient_checkpointing()
        seconds = timed(lambda: step(bf16), repeats)
        rows.append((name, seconds, step(bf16)))
    model.disable_gradient_checkpointing()
    base_s, base_b = rows[0][1], rows[0][2]
    for name, seconds, saved in rows:
        print(f"  {name:34s} {seconds:7.2f} s/step  x{base_s / seconds:.2f} speed   "
              f"saved for backward {saved / 2**20:8.1f} MiB  x{saved / base_b:.3f} memory")

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt_rows = []
    for name, kwargs in (("loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-4, **kwargs)
        opt_rows.append((name, timed(opt.step, max(repeats, 5))))
    for name, seconds in opt_rows:
        print(f"  AdamW {name:8s} {seconds * 1e3:8.1f} ms/step  x{opt_rows[0][1] / seconds:.2f} vs loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--preset", default="demo", help="model of the throughput run (the demo preset: 4.3M)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (clips per step)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--switches", action="store_true", help="also time the training switches (minutes)")
    parser.add_argument("--switch-preset", default="S")
    parser.add_argument("--switch-frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            shards = make_shards(root, args.preset)
            plain = plain_loop(shards, args.steps, args.batch, args.preset, threads=2)
            half = plain_loop(shards, args.steps, args.batch // 2, args.preset, threads=1)
            ray_rate, rss, wait = ray_train(shards, root, args.steps, args.batch, args.preset)
            with torch.device("meta"):
                numel = sum(p.numel() for p in LetsTalkTransformer(**shard_arch(shards, args.preset)).parameters())
        step = args.batch / ray_rate
        reduce_s = allreduce_seconds(numel)
        print(f"{args.preset} preset ({numel / 1e6:.2f}M parameters), global batch {args.batch}, {args.steps} steps: "
              f"plain loop {plain:.1f} samples/s, Ray Train + DeepSpeed ZeRO-2 (2 workers) {ray_rate:.1f} samples/s, "
              f"ratio {ray_rate / plain:.2f}")
        print(f"  where it goes: one worker's work alone (batch {args.batch // 2}, 1 thread) {half:.1f} samples/s, so "
              f"2 workers at best {2 * half:.1f} ({2 * half / plain:.2f} of the plain loop); Ray Train reaches "
              f"{ray_rate / (2 * half):.2f} of that. Per step of {step * 1e3:.0f} ms: gloo all-reduce of the "
              f"gradients {reduce_s * 1e3:.1f} ms alone ({reduce_s / step:.0%}), rank 0 waited for data {wait:.1%}; "
              f"peak RSS per worker {rss:.0f} MB")
    if not args.skip_memory:
        memory_on_paper()
        time_on_paper()
    if args.switches:
        training_switches(args.switch_preset, args.switch_frames, args.repeats)


if __name__ == "__main__":
    main()
