"""Ray Train + DeepSpeed on 2 CPU workers, a real sqlite MLflow store, the registry (tiny preset)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from conftest import DRAWN_FACES, printed_summary, talking_video
from letstalk import LetsTalkTransformer
from letstalk.media import probe
from letstalk.training import EMA, Augment, init_from_checkpoint, prepare_batch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(ray_local, bundle, tmp_path_factory):
    from letstalk_platform.preprocess import PreprocessConfig, run_preprocess

    raw = tmp_path_factory.mktemp("train_raw")
    for i in range(5):
        talking_video(raw / f"spk{i}.mp4", 60, seed=i, identity=f"spk{i}")
    out = tmp_path_factory.mktemp("train_shards")
    run_preprocess(PreprocessConfig(input=str(raw), output=str(out), model=str(bundle), stride=2, eval_fraction=0.2,
                                    faces=DRAWN_FACES))
    return out


def train(shards, tmp_path, overrides: dict):
    """run_training on the tiny preset; `overrides` by dotted key ("optim.zero_stage": 3)."""
    from letstalk_platform.runtime import with_overrides
    from letstalk_platform.train import TrainConfig, run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = {"model": {"preset": "tiny"}, "data": {"path": str(shards), "batch_size": 4}, "optim": {"lr": 1e-3},
                "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
                "tracking": {"storage": str(tmp_path / "runs"), "mlflow_uri": uri, "experiment": "test",
                             "register_name": "letstalk-test"},
                "log_every": 1}
    cfg = TrainConfig.model_validate(with_overrides(settings, overrides))
    return run_training(cfg), uri


def history(uri, run_id, key):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_zero2_training_learns_tracks_and_registers(shards, tmp_path):
    from letstalk.pipeline import LetsTalkPipeline
    from letstalk_platform.tracking import resolve_bundle

    summary, uri = train(shards, tmp_path, {"steps": 30, "checkpoint_every": 15, "optim.zero_stage": 2,
                                            "tracking.name": "z2"})
    assert summary["steps"] == 30
    loss = dict(history(uri, summary["run_id"], "loss"))
    assert sorted(loss) == list(range(1, 31))
    early, late = np.mean([loss[s] for s in range(1, 6)]), np.mean([loss[s] for s in range(26, 31)])
    assert late < 0.5 * early, (early, late)

    client = MlflowClient(uri)
    run = client.get_run(summary["run_id"])
    assert run.data.params["model.preset"] == "tiny" and run.data.params["optim.zero_stage"] == "2"
    assert run.data.params["arch.hidden_size"] == "64" and run.data.params["augment.flip_prob"] == "0.5"
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
    # the bundle holds the fp32 EMA weights of the final checkpoint
    ckpt = Path(summary["checkpoint"])
    exported = load_file(local / "transformer" / "diffusion_pytorch_model.safetensors")
    in_ckpt = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == in_ckpt.keys() and all(torch.equal(exported[k], in_ckpt[k]) for k in in_ckpt)
    assert {v.dtype for v in exported.values()} == {torch.float32}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 30 and state["world_size"] == 2

    # the same (storage, name) again with more steps: Ray Train resumes from the latest checkpoint
    more, _ = train(shards, tmp_path, {"steps": 33, "checkpoint_every": 15, "optim.zero_stage": 2,
                                       "tracking.name": "z2", "sample_clips": 0, "tracking.register_name": None})
    resumed = [s for s, _ in history(uri, more["run_id"], "loss")]
    assert resumed == [31, 32, 33] and more["steps"] == 33
    # submitted again with another batch size and seed: it would not go on exactly, so it is refused,
    # in one line naming both, before Ray starts (jobs/train.py; --allow-config-change would go on)
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(shards), "--preset", "tiny",
                          "--batch-size", "2", "--seed", "1", "--storage", str(tmp_path / "runs"), "--name", "z2",
                          "--mlflow-uri", uri, "--steps", "36"], capture_output=True, text=True)
    assert job.returncode == 2, job.stderr[-1500:]
    assert job.stderr.startswith("train: error: cannot resume z2/checkpoint_000000033 exactly:"), job.stderr[-1500:]
    assert job.stderr.count("\n") == 1 and "Ray instance" not in job.stdout + job.stderr, job.stderr[-1500:]
    assert "seed 0 (checkpoint) vs 1 (this run)" in job.stderr and "data.batch_size 4 (checkpoint) vs 2" in job.stderr
    assert json.loads((Path(more["checkpoint"]) / "state.json").read_text())["settings"] == \
        {"seed": 0, "data.shuffle": True, "data.batch_size": 4, "model.preset": "tiny"}
    assert not (Path(more["checkpoint"]) / "resume.json").exists()  # the settings live in state.json now

    # on demand: jobs/register.py turns a checkpoint into another registry version
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "register.py"), "--checkpoint", str(ckpt), "--data",
                          str(shards), "--mlflow-uri", uri, "--name", "letstalk-test", "--alias", "production"],
                         capture_output=True, text=True)
    assert job.returncode == 0, job.stderr[-1500:]
    assert "models:/letstalk-test@production (version 2" in job.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "register.py"), "--checkpoint", str(shards),
                          "--data", str(shards), "--mlflow-uri", uri], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a training checkpoint" in bad.stderr


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
    sample_clips 1 (the default) a sample video is rendered and logged at every checkpoint too.
    ZeRO-3 (parameters partitioned) without samples; ZeRO-2 (optimizer states and gradients
    partitioned) with them: a ZeRO-2 case without samples would exercise nothing these two do not."""
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


def _ema_export_loop(config):
    """Inside one Ray Train run, for each ZeRO stage in turn: a new engine, whose steps must move
    the audio projection; then a known pattern as the EMA shadow and a different one as the live
    masters: the export must return the pattern for every tensor."""
    import ray.train

    for cfg in config["cfgs"]:
        _ema_export_stage(cfg, config["arch"], Path(config["out"]) / f"zero{cfg.optim.zero_stage}.json")
    ray.train.report({})


def _ema_export_stage(cfg, arch, out: Path) -> None:
    import ray.train
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from letstalk.diffusion import GaussianDiffusion
    from letstalk.training import loss_terms
    from letstalk_platform.train import build_engine, full_ema_state, master_weights

    rank = ray.train.get_context().get_world_rank()
    engine = build_engine(cfg, arch, torch.device("cpu"), rank)
    params = dict(engine.module.named_parameters())

    def full(p):
        value = safe_get_full_fp32_param(p)
        return (p.detach() if value is None else value).clone()

    def set_full(p, value):
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, value)
        else:
            p.data.copy_(value)

    audio = [p for n, p in params.items() if n.startswith("audio_proj.")]
    opt = engine.optimizer
    groups = (getattr(opt, "fp16_groups", None) or getattr(opt, "bit16_groups", None)
              or [g["params"] for g in opt.param_groups])
    in_optimizer = {id(p) for g in groups for p in g}
    before = [full(p) for p in audio]
    s, c, f = arch.input_size, arch.in_channels, arch.num_frames
    g = torch.Generator().manual_seed(rank)
    inputs = {"x0": torch.randn(2, f, c, s, s, generator=g), "portrait": torch.randn(2, c, s, s, generator=g),
              "audio": torch.randn(2, f, arch.audio_window, arch.audio_layers, arch.audio_feature_dim, generator=g),
              "motion": torch.randn(2, arch.num_motion_frames, c, s, s, generator=g)}
    for _ in range(3):  # the zero-initialised output projections pass no gradient to the audio in step 1
        engine.backward(loss_terms(engine, GaussianDiffusion(learn_sigma=arch.learn_sigma), inputs, g)["loss"])
        engine.step()
    moved = min(float((full(p) - b).abs().max()) for p, b in zip(audio, before))
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}
    pattern = {n: (torch.arange(int(np.prod(s)), dtype=torch.float32).reshape(s) % 97) * 1e-3 + i
               for i, (n, s) in enumerate(shapes.items())}
    for n, p in params.items():
        set_full(p, pattern[n])
    ema = EMA(master_weights(engine), decay=0.9)
    for n, p in params.items():
        set_full(p, -pattern[n])
    exported = full_ema_state(engine, ema, rank)
    restored = all(torch.equal(full(p), -pattern[n]) for n, p in params.items())
    persistent = sum(bool(getattr(p, "ds_persist", False)) for p in params.values())

    metrics = {"restored": restored, "persistent": persistent, "audio_tensors": len(audio),
               "audio_in_optimizer": sum(id(p) in in_optimizer for p in audio), "audio_moved": moved}
    if rank == 0:
        metrics |= {"tensors": len(exported), "exact": sum(torch.equal(exported[n], pattern[n]) for n in params),
                    "dtypes": sorted({str(v.dtype) for v in exported.values()})}
        out.write_text(json.dumps(metrics))


def test_ema_export_is_the_shadow_for_every_tensor(ray_local, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from letstalk.config import LetsTalkConfig
    from letstalk_platform.train import TrainConfig

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not see tests/
    stages = [0, 1, 2, 3]  # one Ray Train run (its start-up is most of the time), an engine per stage
    cfgs = [TrainConfig(data={"path": "unused"}, model={"preset": "tiny"}, optim={"zero_stage": stage, "lr": 1e-2})
            for stage in stages]
    arch = LetsTalkConfig.from_name("tiny", num_frames=4, input_size=8)
    trainer = TorchTrainer(_ema_export_loop, train_loop_config={"cfgs": cfgs, "arch": arch, "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="ema", storage_path=str(tmp_path)),
                           torch_config=TorchConfig(backend="gloo"))
    trainer.fit()
    n = len(list(LetsTalkTransformer(**arch.to_dict()).parameters()))
    for stage in stages:
        m = json.loads((tmp_path / f"zero{stage}.json").read_text())
        assert m["tensors"] == n and m["exact"] == n and m["dtypes"] == ["torch.float32"], (stage, m)
        assert m["restored"], stage  # the live masters are back after the export
        if stage == 3:  # tiny: every tensor is under ZeRO-3's persistence threshold (the case that exported live values)
            assert m["persistent"] > 0
        assert m["audio_tensors"] > 0 and m["audio_in_optimizer"] == m["audio_tensors"] and m["audio_moved"] > 0, \
            (stage, m)


def test_resume_compares_the_settings_that_make_it_exact(tmp_path):
    """A checkpoint's recorded settings (state.json) against the run that resumes it: each of seed,
    data.shuffle, data.batch_size and model.preset refused in one line naming it, unless
    allow_config_change."""
    from letstalk.artifacts import CheckpointState
    from letstalk_platform.runtime import with_overrides
    from letstalk_platform.train import RESUME_FILE, TrainConfig, check_resume, job_args, resume_settings

    base = {"model": {"preset": "tiny"}, "data": {"path": "d", "batch_size": 4}, "seed": 3}
    ckpt = tmp_path / "run" / "checkpoint_000000006"
    ckpt.mkdir(parents=True)
    CheckpointState(step=6, data_position=(1, 2), world_size=2, seed=3,
                    settings=resume_settings(TrainConfig.model_validate(base))).save(ckpt)

    def cfg(**overrides):
        return TrainConfig.model_validate(with_overrides(base, overrides))

    assert check_resume(cfg(), ckpt) == []
    assert check_resume(cfg(**{"optim.lr": 1e-3, "steps": 9}), ckpt) == []  # not among RESUME_KEYS
    for key, value, said in [("seed", 4, "seed 3 (checkpoint) vs 4 (this run)"),
                             ("data.shuffle", False, "data.shuffle True (checkpoint) vs False (this run)"),
                             ("data.batch_size", 2, "data.batch_size 4 (checkpoint) vs 2 (this run)"),
                             ("model.preset", "S", "model.preset 'tiny' (checkpoint) vs 'S' (this run)")]:
        with pytest.raises(ValueError) as e:
            check_resume(cfg(**{key: value}), ckpt)
        message = str(e.value)
        assert "\n" not in message and message.startswith("cannot resume run/checkpoint_000000006 exactly: ")
        assert said in message and "--allow-config-change" in message, message
        assert check_resume(cfg(**{key: value, "allow_config_change": True}), ckpt) == [said]
    with pytest.raises(ValueError, match="seed 3 .* data.batch_size 4"):  # every difference named
        check_resume(cfg(seed=0, **{"data.batch_size": 8}), ckpt)

    # a checkpoint from before state.json held the settings: they are read from its resume.json
    CheckpointState(step=6, data_position=(1, 2), world_size=2, seed=3).save(ckpt)
    (ckpt / RESUME_FILE).write_text(json.dumps(resume_settings(TrainConfig.model_validate(base))))
    assert check_resume(cfg(), ckpt) == []
    with pytest.raises(ValueError, match="data.batch_size 4 .checkpoint. vs 2"):
        check_resume(cfg(**{"data.batch_size": 2}), ckpt)
    # a checkpoint from before resume.json: what its state.json holds (seed, shuffle) is compared
    (ckpt / RESUME_FILE).unlink()
    assert check_resume(cfg(**{"data.batch_size": 2}), ckpt) == []
    with pytest.raises(ValueError, match="seed 3 .checkpoint. vs 4"):
        check_resume(cfg(seed=4), ckpt)
    # the flag of jobs/train.py and jobs/distill.py
    assert vars(job_args("x", {}, "", ["--allow-config-change"])) == \
        {"config": None, "debug_steps": None, "allow_config_change": True}


def test_optimizer_choice_reaches_the_deepspeed_config(tmp_path):
    from pydantic import ValidationError

    from letstalk_platform.train import TrainConfig, deepspeed_config

    base = tmp_path / "ds.json"  # a GPU base config naming DeepSpeed's own FusedAdam
    base.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6, "foreach": True}}}))

    def params(kernel="auto", use_gpu=False):
        cfg = TrainConfig(data={"path": "d"}, optim={"deepspeed": str(base), "kernel": kernel},
                          scaling={"use_gpu": use_gpu})
        return deepspeed_config(cfg)["optimizer"]["params"]

    assert params() == {"eps": 1e-6, "lr": 1e-4, "weight_decay": 0.0, "torch_adam": True, "fused": True}
    assert params("foreach")["foreach"] is True and "fused" not in params("foreach")
    assert params("loop")["foreach"] is False
    gpu = params("deepspeed", use_gpu=True)
    assert not {"torch_adam", "fused", "foreach"} & gpu.keys()
    with pytest.raises(ValidationError, match="needs scaling.use_gpu"):
        TrainConfig(data={"path": "d"}, optim={"kernel": "deepspeed"})
    with pytest.raises(ValidationError):
        TrainConfig(data={"path": "d"}, optim={"kernel": "sgd"})


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
    summary = printed_summary(job.stdout)
    assert summary["steps"] == 3 and summary["registered"].startswith("models:/letstalk@candidate")
    assert (tmp_path / "m.db").is_file() and (tmp_path / "runs" / "letstalk" / "bundle" / "pipeline.json").is_file()
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data", data, "--preset", "XXL"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def _ddim(model, diffusion, inputs, noise, steps, clip_range):
    """DDIM-`steps` samples of `model` for a batch of training clips (their portrait, audio, motion)."""
    cond = (inputs["portrait"], inputs["audio"], inputs["motion"])
    return diffusion.sample(lambda x, t: model(x, t, *cond), noise, sampler="ddim", steps=steps, clip_range=clip_range)


@pytest.mark.heavy
def test_distillation_job_makes_a_two_step_student(shards, tmp_path):
    """jobs/distill.py from a shell, the teacher from the registry: the student is registered, its
    bundle renders ddim 2 unless told otherwise, keeps the teacher's target, and its 2-step samples
    are closer to the teacher's 8-step samples than the teacher's own 2-step samples are. A teacher
    whose codecs did not make the shards is a one-line error before Ray starts."""
    from letstalk.diffusion import GaussianDiffusion
    from letstalk.pipeline import LetsTalkPipeline
    from letstalk_platform.data import ClipTable
    from letstalk_platform.tracking import resolve_bundle

    # a teacher that has learned something (a fresh one outputs zeros: adaLN-Zero), v-prediction of the residual
    trained, uri = train(shards, tmp_path, {"steps": 40, "checkpoint_every": 40, "tracking.name": "teacher",
                                            "tracking.register_name": "letstalk-teacher", "sample_clips": 0,
                                            "target.residual": True, "target.residual_scale": 4.0,
                                            "target.prediction": "v_prediction"})
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "distill.py"), "--teacher",
                          "models:/letstalk-teacher@candidate", "--data", str(shards), "--mlflow-uri", uri,
                          "--student-steps", "2", "--teacher-steps", "8", "--steps", "40", "--lr", "1e-3", "--log-every", "1",
                          "--ema-warmup",
                          "--batch-size", "4", "--num-workers", "2", "--cpus-per-worker", "0.5",
                          "--storage", str(tmp_path / "runs"), "--name", "student", "--register-name",
                          "letstalk-student"], capture_output=True, text=True)
    assert job.returncode == 0, job.stderr[-2000:]
    summary = printed_summary(job.stdout)
    assert summary["steps"] == 40 and summary["registered"].startswith("models:/letstalk-student@candidate")
    loss = dict(history(uri, summary["run_id"], "loss"))
    assert np.mean([loss[s] for s in range(31, 41)]) < 0.7 * np.mean([loss[s] for s in range(1, 11)]), loss

    teacher = LetsTalkPipeline.from_pretrained(resolve_bundle(trained["bundle"]))
    student_dir = resolve_bundle("models:/letstalk-student@candidate", uri, cache=tmp_path / "cache")
    student = LetsTalkPipeline.from_pretrained(student_dir)
    assert student.sampling() == ("ddim", 2) and teacher.sampling() == ("ddim", 25)
    for key in ("residual", "residual_scale", "residual_base", "prediction"):
        assert getattr(student.settings, key) == getattr(teacher.settings, key)

    # the student's 2 steps vs the teacher's 8, on training clips with the same noise
    table = ClipTable(shards, "train", ["latents", "audio", "motion", "refs"])
    batch = {k: torch.from_numpy(v) for k, v in table.read(list(range(0, len(table), max(1, len(table) // 6)))).items()}
    inputs = prepare_batch(batch, Augment(flip_prob=0, audio_dropout=0, motion_noise=0, motion_ref_prob=0),
                           teacher.transformer.cfg.audio_window, torch.Generator().manual_seed(0), teacher.target)
    noise = torch.randn(inputs["x0"].shape, generator=torch.Generator().manual_seed(1))
    diffusion = GaussianDiffusion(learn_sigma=True, prediction="v_prediction")
    clip = teacher.target.sample_range(teacher.codec.sample_range)
    with torch.no_grad():
        goal = _ddim(teacher.transformer, diffusion, inputs, noise, 8, clip)
        own = ((_ddim(teacher.transformer, diffusion, inputs, noise, 2, clip) - goal) ** 2).mean().item()
        distilled = ((_ddim(student.transformer, diffusion, inputs, noise, 2, clip) - goal) ** 2).mean().item()
    assert distilled < 0.7 * own, (distilled, own)

    # going on from that student (--init-from its weights): the new run starts from them, not from the teacher
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    on = subprocess.run([sys.executable, str(ROOT / "jobs" / "distill.py"), "--teacher",
                         "models:/letstalk-teacher@candidate", "--data", str(shards), "--mlflow-uri", uri,
                         "--init-from", str(student_dir / "transformer" / "diffusion_pytorch_model.safetensors"),
                         "--teacher-steps", "16", "--steps", "2", "--lr", "1e-12", "--ema-warmup", "--batch-size", "4",
                         "--num-workers", "2", "--cpus-per-worker", "0.5", "--storage", str(tmp_path / "runs"),
                         "--name", "student-on", "--register-name", "letstalk-student"], capture_output=True, text=True)
    assert on.returncode == 0, on.stderr[-2000:]
    assert printed_summary(on.stdout)["registered"] == "models:/letstalk-student@candidate (version 2)"
    again = LetsTalkPipeline.from_pretrained(resolve_bundle("models:/letstalk-student@candidate", uri,
                                                            cache=tmp_path / "cache"))
    moved = (weights(again.transformer) - weights(student.transformer)).abs().max().item()
    apart = (weights(teacher.transformer) - weights(student.transformer)).abs().max().item()
    assert apart > 1e-3 and moved < 1e-3 * apart, (moved, apart)
    wrong = tmp_path / "wrong.safetensors"
    save_file(LetsTalkTransformer.from_preset("tiny", depth=1).state_dict(), str(wrong))
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "distill.py"), "--teacher",
                          "models:/letstalk-teacher@candidate", "--data", str(shards), "--mlflow-uri", uri,
                          "--init-from", str(wrong), "--storage", str(tmp_path / "runs")], capture_output=True, text=True)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and "not a student of this teacher's architecture" in last, bad.stderr[-500:]

    other = tmp_path / "other-codecs"
    LetsTalkPipeline.init_tiny(seed=1).save_pretrained(other)
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "distill.py"), "--teacher", str(other), "--data",
                          str(shards), "--mlflow-uri", uri, "--storage", str(tmp_path / "runs")],
                         capture_output=True, text=True)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("distill: error:") and "is not the one that tokenized" in last, \
        bad.stderr[-500:]
