"""Checkpoint and resume state of a training run: what a checkpoint folder holds, and how a run
finds, checks and resumes it.

A checkpoint folder holds DeepSpeed's own files (`ds/`: weights, optimizer, LR schedule; per
rank), `ema-rank{r}.safetensors` (each rank's EMA of its fp32 master partitions), `rank{r}.json`
(each rank's RNG states, `rng_state`, and the node it ran on), `state.json` (step, data position,
world size, and the settings an exact resume must share: RESUME_KEYS; letstalk.artifacts.CheckpointState)
and `transformer/` (the full EMA model, fp32 config.json + safetensors, loadable without Ray or
DeepSpeed). `save_and_report` writes one through Ray Train; `LATEST` names the newest complete one
(`latest_checkpoint`). Resuming from it continues the run exactly (docs/training.md); a resume with
other RESUME_KEYS is refused before Ray starts unless `allow_config_change` (`check_resume`).
Checkpoints written before state.json held those settings kept them in `resume.json` (RESUME_FILE),
still read.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from letstalk.artifacts import CheckpointState, RankState, ema_file, write_json_atomic
from letstalk.config import LetsTalkConfig
from letstalk.training import EMA
from letstalk.transformer import LetsTalkTransformer

from .ema_export import full_ema_state
from .train_config import TrainConfig


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a worker draws from (JSON-able)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "generator": generator.get_state().tolist(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


LATEST = "latest_checkpoint.json"


def latest_checkpoint(reported, run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of this run: the one Ray Train hands back, or the one
    `LATEST` names, whichever holds the later step.

    Ray Train registers a reported checkpoint asynchronously: a worker that dies a moment after a
    report can take the registration with it, and the restarted workers would then begin again from
    step 0. `LATEST` is written by rank 0 after every rank has finished writing, so it is never lost."""
    found: list[Path] = []
    if reported is not None and Path(reported.path).is_dir():  # shared storage: read it in place
        found.append(Path(reported.path))
    pointer = run_dir / LATEST
    if pointer.is_file():
        found.append(run_dir / json.loads(pointer.read_text())["dir"])
    found = [d for d in found if (d / CheckpointState.FILE).is_file()]
    return max(found, key=lambda d: CheckpointState.load(d, resumable=False).step, default=None)


RESUME_FILE = CheckpointState.LEGACY_SETTINGS_FILE  # where checkpoints kept the settings before state.json did
# what a resumed run must share with its checkpoint to go on exactly as the uninterrupted run: the data
# order (seed, shuffle, batch size), the random streams (seed) and the network (preset)
RESUME_KEYS = ("seed", "data.shuffle", "data.batch_size", "model.preset")


def resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """RESUME_KEYS with their values in `cfg`: what each checkpoint records (CheckpointState.settings)."""
    return {"seed": cfg.seed, "data.shuffle": cfg.data.shuffle, "data.batch_size": cfg.data.batch_size,
            "model.preset": cfg.model.preset}


def check_resume(cfg: TrainConfig, checkpoint: Path) -> list[str]:
    """Refuse to resume `checkpoint` with RESUME_KEYS other than those it was trained with: a one-line
    ValueError naming them. With cfg.allow_config_change the changes are returned instead (for the
    log). A checkpoint from before the settings were recorded (in state.json, or earlier in resume.json:
    CheckpointState.load reads either) is compared on what its state.json holds (seed, shuffle)."""
    state = CheckpointState.load(checkpoint, resumable=False)
    recorded = state.settings if state.settings is not None else {"seed": state.seed, "data.shuffle": state.shuffle}
    now = resume_settings(cfg)
    changed = [f"{key} {recorded[key]!r} (checkpoint) vs {now[key]!r} (this run)"
               for key in RESUME_KEYS if key in recorded and recorded[key] != now[key]]
    if changed and not cfg.allow_config_change:
        raise ValueError(f"cannot resume {checkpoint.parent.name}/{checkpoint.name} exactly: {', '.join(changed)}; "
                         "give the checkpoint's settings, or a new tracking.name, or --allow-config-change "
                         "(allow_config_change: true) to go on from it anyway")
    return changed


def save_and_report(engine, ema: EMA, rank: int, arch: LetsTalkConfig, metrics: dict, state: CheckpointState,
                    rank_state: RankState, run_dir: Path) -> dict[str, torch.Tensor] | None:
    """Every rank: write this checkpoint (DeepSpeed's ds/, its EMA shard, its rank{r}.json; rank 0 also
    transformer/, the whole EMA model, and state.json) into a temporary folder and hand it to Ray Train
    with `metrics` (`ray.train.report`); then, once every rank has, point `LATEST` at it. A collective
    (the EMA export). Returns the whole EMA state on rank 0, None elsewhere."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    full = full_ema_state(engine, ema, rank)
    name = f"checkpoint_{state.step:09d}"
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="ds")
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(ema_file(d, rank)))
        rank_state.save(d, rank)
        if rank == 0:
            model = LetsTalkTransformer(**arch.to_dict())
            model.load_state_dict(full)
            model.save_pretrained(Path(d) / "transformer")
            state.save(d)  # with the settings an exact resume must share (state.settings)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)
    dist.barrier()  # every rank's files are in storage
    if rank == 0 and (run_dir / name / CheckpointState.FILE).is_file():
        write_json_atomic(run_dir / LATEST, {"dir": name, "step": state.step})
    return full
