"""Distillation (jobs/distill.py) under Ray Train + DeepSpeed: a 2-step student of a registered teacher."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import printed_summary
from letstalk import LetsTalkTransformer
from letstalk.training import Augment, prepare_batch
from trainkit import history, make_shards, train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(ray_local, bundle, tmp_path_factory):
    return make_shards(bundle, tmp_path_factory)


def _ddim(model, diffusion, inputs, noise, steps, clip_range):
    """DDIM-`steps` samples of `model` for a batch of training clips (their portrait, audio, motion)."""
    cond = (inputs["portrait"], inputs["audio"], inputs["motion"])
    return diffusion.sample(lambda x, t: model(x, t, *cond), noise, sampler="ddim", steps=steps, clip_range=clip_range)


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
