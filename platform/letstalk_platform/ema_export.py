"""The EMA of a training run: what it averages and how the whole EMA model is assembled from it.

The EMA (letstalk.training.EMA) averages the optimizer's fp32 master weights (`master_weights`), so
it is sharded exactly like DeepSpeed's optimizer state and never sees a bf16 working copy.
`full_ema_state` gathers the whole EMA model, every tensor in fp32, on rank 0: what each checkpoint's
transformer/ and the registered bundle hold (checkpoint.save_and_report), and what the sample
videos render with. Runs inside the Ray Train workers.
"""

from __future__ import annotations

import torch

from letstalk.training import EMA


def master_weights(engine) -> dict[str, torch.Tensor]:
    """This rank's fp32 master weights, the tensors the optimizer steps: the flat fp32 partitions of
    ZeRO-3 / ZeRO-1-2 / DeepSpeed's bf16 optimizer, or (no ZeRO, fp32) the parameters themselves.
    The EMA averages these, so it is fp32, sharded like the optimizer state, and never sees the
    rounding of a bf16 working copy."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(opt, attr, None)
        if flats:
            return {f"{attr}.{i}": t for i, t in enumerate(flats)}
    params = dict(engine.module.named_parameters())
    if any(p.dtype != torch.float32 for p in params.values()):
        raise RuntimeError("no fp32 master weights found: the EMA needs a ZeRO/bf16 optimizer or fp32 parameters")
    return params


def full_ema_state(engine, ema: EMA, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole EMA model, every tensor in fp32, on rank 0 (None elsewhere); a collective under ZeRO.

    The EMA shadow is swapped into the master weights, DeepSpeed assembles each full fp32 parameter
    from them (`safe_get_full_fp32_param`: all-gather under ZeRO-3, all-reduce of the fragments under
    ZeRO-1/2, for persistent parameters too), and the live masters are put back."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = master_weights(engine)
    live = {k: v.detach().clone() for k, v in masters.items()}
    state: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for k, v in masters.items():
                v.copy_(ema.shadow[k])
            for name, p in engine.module.named_parameters():
                full = safe_get_full_fp32_param(p)
                full = p.detach() if full is None else full  # no ZeRO: the parameter is the master
                if rank == 0:
                    state[name] = full.detach().float().cpu().clone().reshape(p.ds_shape if hasattr(p, "ds_shape")
                                                                              else p.shape)
    finally:
        with torch.no_grad():
            for k, v in masters.items():
                v.copy_(live[k])
    return state if rank == 0 else None
