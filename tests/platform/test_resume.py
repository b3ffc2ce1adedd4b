"""Exact resume under Ray Train + DeepSpeed: a worker killed mid-run, the run resumed from its last
checkpoint, the end equal to an uninterrupted run's (tiny preset, 2 CPU workers)."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from trainkit import history, make_shards, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(ray_local, bundle, tmp_path_factory):
    return make_shards(bundle, tmp_path_factory)


def fp32_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The live model weights of a checkpoint, assembled from DeepSpeed's ZeRO files (any stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds").items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("stage, sample_clips", [(3, 0), pytest.param(2, 1, id="2-with-samples")])
def test_a_killed_worker_resumes_exactly(shards, tmp_path, stage, sample_clips):
    """Rank 1 dies at step 5 (checkpoints at 3 and 6): steps 4-5 are redone from the step-3
    checkpoint, and the end equals an uninterrupted run: weights, EMA and every logged loss. With
    sample_clips 1 (the default) a sample video is rendered and logged at every checkpoint too."""
    common = {"steps": 7, "checkpoint_every": 3, "optim.zero_stage": stage, "tracking.register_name": None,
              "sample_clips": sample_clips, "optim.ema_decay": 0.6, "data.batch_size": 2, "data.prefetch_batches": 2}
    straight, uri = train(shards, tmp_path, common | {"tracking.name": f"straight{stage}"})
    killed, _ = train(shards, tmp_path, common | {"tracking.name": f"killed{stage}", "fail_at_step": 5,
                                                  "scaling.max_failures": 1})
    assert (tmp_path / "runs" / f"killed{stage}" / ".chaos-done").read_text().startswith("killed rank 1 at step 5")
    assert killed["steps"] == straight["steps"] == 7
    if sample_clips:  # the samples were rendered, by both runs (the killed one at 3 before it died, then at 6, 7)
        for run in (straight, killed):
            logged = sorted(Path(a.path).name for a in MlflowClient(uri).list_artifacts(run["run_id"], "samples"))
            assert logged == [f"step000000{s}-clip0.mp4" for s in (3, 6, 7)], logged

    logged = [s for s, _ in history(uri, killed["run_id"], "loss")]
    assert sorted(set(logged)) == list(range(1, 8))
    assert [logged.count(s) for s in (1, 2, 3, 4)] == [1, 1, 1, 2]  # resumed at 3, not restarted from 0
    loss = dict(history(uri, straight["run_id"], "loss"))
    resumed = dict(history(uri, killed["run_id"], "loss"))  # the later (resumed) value of a redone step
    assert all(abs(resumed[s] - loss[s]) <= 1e-6 for s in range(1, 8)), (resumed, loss)

    a, b = Path(straight["checkpoint"]), Path(killed["checkpoint"])
    ema_a = load_file(a / "transformer" / "diffusion_pytorch_model.safetensors")
    ema_b = load_file(b / "transformer" / "diffusion_pytorch_model.safetensors")
    weights, ema = max_diff(fp32_weights(a), fp32_weights(b)), max_diff(ema_a, ema_b)
    print(f"ZeRO-{stage} kill at step 5, resumed from 3: max |weights diff| {weights:.3g}, max |EMA diff| {ema:.3g}")
    assert weights <= 1e-6 and ema <= 1e-6
    # the comparison has teeth: the EMA is neither the live weights nor the initial ones
    assert max_diff(ema_a, fp32_weights(a)) > 1e-5
    if stage == 3:  # the EMA was sharded per rank (a partition of the fp32 masters)
        shard0 = load_file(a / "ema-rank0.safetensors")
        assert sum(v.numel() for v in shard0.values()) < sum(v.numel() for v in ema_a.values())
