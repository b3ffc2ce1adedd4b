"""Ray Train + DeepSpeed on 2 CPU workers, a real sqlite MLflow store, the registry (tiny preset)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import talking_video
from letstalk import LetsTalkTransformer
from letstalk.media import probe
from letstalk.training import EMA, Augment, init_from_checkpoint, prepare_batch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(ray_local, bundle, tmp_path_factory):
    from letstalk_platform.preprocess import PreprocessConfig, run_preprocess

    raw = tmp_path_factory.mktemp("train_raw")
    for i in range(5):
        talking_video(raw / f"spk{i}.mp4", 60, seed=i, identity=f"spk{i}")
    out = tmp_path_factory.mktemp("train_shards")
    run_preprocess(PreprocessConfig(input=str(raw), output=str(out), model=str(bundle), stride=2, eval_fraction=0.2))
    return out


def train(shards, tmp_path, **overrides):
    from letstalk_platform.train import TrainConfig, run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = dict(data=str(shards), preset="tiny", batch_size=4, lr=1e-3, num_workers=2, cpus_per_worker=0.5,
                    storage=str(tmp_path / "runs"), mlflow_uri=uri, experiment="test", log_every=1,
                    register_name="letstalk-test")
    cfg = TrainConfig(**(settings | overrides))
    return run_training(cfg), uri


def history(uri, run_id, key):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_zero2_training_learns_tracks_and_registers(shards, tmp_path):
    from letstalk.pipeline import LetsTalkPipeline
    from letstalk_platform.tracking import resolve_bundle

    summary, uri = train(shards, tmp_path, steps=30, checkpoint_every=15, zero_stage=2, name="z2")
    assert summary["steps"] == 30
    loss = dict(history(uri, summary["run_id"], "loss"))
    assert sorted(loss) == list(range(1, 31))
    early, late = np.mean([loss[s] for s in range(1, 6)]), np.mean([loss[s] for s in range(26, 31)])
    assert late < 0.5 * early, (early, late)

    client = MlflowClient(uri)
    run = client.get_run(summary["run_id"])
    assert run.data.params["preset"] == "tiny" and run.data.params["zero_stage"] == "2"
    assert {"loss", "mse", "vb", "grad_norm", "samples_per_s", "lr", "data_wait_frac"} <= run.data.metrics.keys()
    assert all(0 <= v < 1 for _, v in history(uri, summary["run_id"], "data_wait_frac"))
    assert run.data.tags["optimizer_kernel"] == "AdamW fused"  # optimizer "auto": torch's fused AdamW
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"config.json", "summary.json", "bundle", "samples"} <= artifacts
    samples = sorted(Path(a.path).name for a in client.list_artifacts(summary["run_id"], "samples"))
    assert samples == ["step0000015-clip0.mp4", "step0000030-clip0.mp4"]
    video = Path(client.download_artifacts(summary["run_id"], "samples/step0000030-clip0.mp4", str(tmp_path)))
    info = probe(video)
    assert info.has_audio and info.has_video and abs(info.duration - 8 / 25) < 0.1

    # the registered version: by alias, loadable without Ray, renders
    local = resolve_bundle("models:/letstalk-test@candidate", uri, cache=tmp_path / "cache")
    pipe = LetsTalkPipeline.from_pretrained(local)
    result = pipe.render(np.full((64, 64, 3), 128, np.uint8), np.random.default_rng(0).standard_normal(8000) * 0.1,
                         steps=2, sampler="ddim")
    assert result.frames.shape == (12, 64, 64, 3)
    # the bundle holds the EMA weights of the final checkpoint
    ckpt = Path(summary["checkpoint"])
    exported = load_file(local / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = torch.load(ckpt / "ema-rank0.pt", weights_only=True)
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 30

    # the same (storage, name) again with more steps: Ray Train resumes from the latest checkpoint
    more, _ = train(shards, tmp_path, steps=33, checkpoint_every=15, zero_stage=2, name="z2", sample_clips=0,
                    register_name=None)
    resumed = [s for s, _ in history(uri, more["run_id"], "loss")]
    assert resumed == [31, 32, 33] and more["steps"] == 33

    # on demand: jobs/register.py turns a checkpoint into another registry version
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "register.py"), "--checkpoint", str(ckpt), "--data",
                          str(shards), "--mlflow-uri", uri, "--name", "letstalk-test", "--alias", "production"],
                         capture_output=True, text=True)
    assert job.returncode == 0, job.stderr[-1500:]
    assert "models:/letstalk-test@production (version 2" in job.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "register.py"), "--checkpoint", str(shards),
                          "--data", str(shards), "--mlflow-uri", uri], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a training checkpoint" in bad.stderr


def test_zero3_resumes_after_a_worker_dies(shards, tmp_path):
    summary, uri = train(shards, tmp_path, steps=6, checkpoint_every=2, zero_stage=3, name="z3", fail_at_step=3,
                         max_failures=2, register_name=None, prefetch_batches=2)
    assert MlflowClient(uri).get_run(summary["run_id"]).data.tags["optimizer_kernel"] == "AdamW fused"
    run_dir = tmp_path / "runs" / "z3"
    assert (run_dir / ".chaos-done").read_text().startswith("killed rank 1 at step 3")
    assert summary["steps"] == 6
    steps = [s for s, _ in history(uri, summary["run_id"], "loss")]
    assert set(steps) == set(range(1, 7))  # continuous: steps 3.. were re-run from the step-2 checkpoint
    assert json.loads((Path(summary["checkpoint"]) / "state.json").read_text())["step"] == 6
    # ZeRO-3: the EMA was sharded per rank and gathered into whole tensors for the export
    model = LetsTalkTransformer.from_pretrained(Path(summary["bundle"]) / "transformer")
    shard0 = torch.load(Path(summary["checkpoint"]) / "ema-rank0.pt", weights_only=True)
    total = sum(p.numel() for p in model.parameters())
    assert sum(v.numel() for v in shard0.values()) < total  # a partition, not the whole model


def test_optimizer_choice_reaches_the_deepspeed_config(tmp_path):
    from pydantic import ValidationError

    from letstalk_platform.train import TrainConfig, deepspeed_config

    base = tmp_path / "ds.json"  # a GPU base config naming DeepSpeed's own FusedAdam
    base.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6, "foreach": True}}}))

    def params(**kw):
        return deepspeed_config(TrainConfig(data="d", deepspeed=str(base), **kw), False)["optimizer"]["params"]

    assert params() == {"eps": 1e-6, "lr": 1e-4, "weight_decay": 0.0, "torch_adam": True, "fused": True}
    assert params(optimizer="foreach")["foreach"] is True and "fused" not in params(optimizer="foreach")
    assert params(optimizer="loop")["foreach"] is False
    gpu = params(optimizer="deepspeed", use_gpu=True)
    assert not {"torch_adam", "fused", "foreach"} & gpu.keys()
    with pytest.raises(ValidationError, match="needs use_gpu"):
        TrainConfig(data="d", optimizer="deepspeed")
    with pytest.raises(ValidationError):
        TrainConfig(data="d", optimizer="sgd")


def test_prepare_batch_shapes_and_augmentations():
    g = torch.Generator().manual_seed(0)
    b, f, w = 8, 8, 5
    batch = {"latents": torch.randn(b, f, 4, 8, 8, dtype=torch.float16),
             "audio": torch.randn(b, f + w - 1, 4, 32, dtype=torch.float16),
             "motion": torch.randn(b, 2, 4, 8, 8, dtype=torch.float16),
             "refs": torch.randn(b, 4, 4, 8, 8, dtype=torch.float16)}
    out = prepare_batch(batch, Augment(flip_prob=0, audio_dropout=0, motion_noise=0, motion_ref_prob=0), w, g)
    assert out["x0"].shape == (b, f, 4, 8, 8) and out["audio"].shape == (b, f, w, 4, 32)
    assert torch.equal(out["x0"], batch["latents"].float()) and torch.equal(out["motion"], batch["motion"].float())
    refs = batch["refs"].float()
    assert all(any(torch.equal(out["portrait"][i], refs[i, k]) for k in range(4)) for i in range(b))
    drop = prepare_batch(batch, Augment(flip_prob=1, audio_dropout=1, motion_noise=0, motion_ref_prob=1), w, g)
    assert drop["audio"].abs().sum() == 0
    assert torch.equal(drop["x0"], batch["latents"].float().flip(-1))
    assert torch.equal(drop["motion"], drop["portrait"][:, None].expand(b, 2, 4, 8, 8))


def test_ema_and_latte_init(tmp_path):
    p = {"w": torch.zeros(3)}
    ema = EMA(p, decay=0.9)
    ema.update({"w": torch.ones(3)})
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.1))
    model = LetsTalkTransformer.from_preset("tiny")
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items() if k.startswith("blocks.0.")}
    state["pos_embed_extra"] = torch.zeros(3)
    state["final_layer.linear.weight"] = torch.zeros(1, 1)  # same name, wrong shape
    torch.save({"ema": state}, tmp_path / "latte.pt")
    report = init_from_checkpoint(model, tmp_path / "latte.pt")
    assert set(report["loaded"]) == {k for k in state if k.startswith("blocks.0.")}
    assert report["unused"] == ["pos_embed_extra"] and report["shape_mismatch"] == ["final_layer.linear.weight"]
    assert torch.all(model.blocks[0].attn.qkv.weight == 0.5)


def test_train_job_from_a_shell_with_relative_paths(shards, tmp_path):
    """The issue's command, no YAML, relative paths, default CPUs per worker on a 2-core machine."""
    import os

    data = os.path.relpath(shards, tmp_path)
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data", data, "--preset", "tiny",
                          "--num-workers", "2", "--debug-steps", "3", "--mlflow-uri", "sqlite:///m.db",
                          "--storage", "runs/"], cwd=tmp_path, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr[-2000:]
    summary = json.loads(job.stdout[job.stdout.index("{"):])
    assert summary["steps"] == 3 and summary["registered"].startswith("models:/letstalk@candidate")
    assert (tmp_path / "m.db").is_file() and (tmp_path / "runs" / "letstalk" / "bundle" / "pipeline.json").is_file()
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data", data, "--preset", "XXL"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
