"""Ray Data preprocessing against a real local Ray, the real ffmpeg and a tiny codec + audio-encoder bundle."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from letstalk.artifacts import ArtifactError, CheckpointState, FeatureShapes, ShardManifest, export_bundle
from letstalk.diffusion import ClipTarget
from letstalk.clips import ClipSpec, build_clip_rows, clip_starts, ref_indices
from letstalk.media import ffmpeg_exe, write_video
from letstalk.synthetic import draw_portrait

from conftest import DRAWN_FACES, talking_video

ROOT = Path(__file__).resolve().parents[2]
FPS, CLIP = 25, 8  # the tiny bundle's clip length


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    for i in range(6):  # 6 speakers, 40..65 frames each
        talking_video(d / f"spk{i}.mp4", 40 + 5 * i, seed=i, identity=f"spk{i}")
    talking_video(d / "spk0_b.mp4", 30, seed=10, identity="spk0")  # a second video of speaker 0
    return d


def run(raw: Path, out: Path, bundle: Path, **kw):
    from letstalk_platform.preprocess import PreprocessConfig, run_preprocess

    cfg = PreprocessConfig(input=str(raw), output=str(out), model=str(bundle), **{"eval_fraction": 0.34, "faces": DRAWN_FACES, **kw})
    return run_preprocess(cfg)


def test_clip_math():
    assert clip_starts(20, 8, 4) == [0, 4, 8, 12] and clip_starts(7, 8, 4) == []
    refs = ref_indices(40, 8, 8, 4)
    assert len(refs) == 4 and not set(refs.tolist()) & set(range(8, 16))
    assert ref_indices(8, 0, 8, 3).tolist() == [0, 0, 0]


def test_clip_rows_layout():
    import torch

    spec = ClipSpec(clip_frames=8, stride=4, motion_frames=2, ref_frames=3)
    n = 21
    latents = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 4, 2, 2)
    states = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 3, 5)
    rows = build_clip_rows("v", "id", latents, states, spec, mouth=np.arange(n, dtype=np.float32))
    assert [r["start"] for r in rows] == [0, 4, 8, 12]
    r = rows[1]
    assert r["latents"].shape == (8, 4, 2, 2) and r["latents"][:, 0, 0, 0].tolist() == list(range(4, 12))
    assert r["audio"].shape == (12, 3, 5) and r["audio"][:, 0, 0].tolist() == list(range(2, 14))
    assert r["motion"][:, 0, 0, 0].tolist() == [2, 3]
    assert rows[0]["motion"][:, 0, 0, 0].tolist() == [0, 0] and rows[0]["audio"][:3, 0, 0].tolist() == [0, 0, 0]
    assert not set(r["refs"][:, 0, 0, 0].astype(int).tolist()) & set(range(4, 12))
    assert r["mouth"].tolist() == list(range(4, 12)) and r["latents"].dtype == np.float16
    # the stored audio context windows back into the model's (F, 5, layers, D) input
    from letstalk.audio import windows_from_context

    win = windows_from_context(torch.from_numpy(r["audio"]).float(), 5)
    assert win.shape == (8, 5, 3, 5) and win[0, :, 0, 0].tolist() == [2, 3, 4, 5, 6]


def test_shards_split_and_rerun(ray_local, raw, bundle, tmp_path):
    from letstalk_platform.data import load_clips

    out = tmp_path / "shards"
    manifest = run(raw, out, bundle, stride=4)
    c = manifest.counts()
    assert c["inputs"] == 7 and c["done"] == 7 and c["failed"] == 0
    assert ShardManifest.load(out) == manifest  # what a reader loads is what the writer had
    # clips per video: floor((frames - 8) / 4) + 1
    expected = {f"spk{i}.mp4": (40 + 5 * i - CLIP) // 4 + 1 for i in range(6)} | {"spk0_b.mp4": (30 - CLIP) // 4 + 1}
    for e in manifest.inputs:
        assert e.clips == expected[Path(e.path).name], e
    assert c["clips"]["train"] + c["clips"]["eval"] == sum(expected.values())
    # identity-level split: both videos of spk0 on the same side; eval identities never in train
    splits = {e.identity: set() for e in manifest.inputs}
    for e in manifest.inputs:
        splits[e.identity].add(e.split)
    assert all(len(s) == 1 for s in splits.values())
    assert c["identities"]["eval"] >= 1 and c["identities"]["train"] >= 1

    train, evaluation = load_clips(out, "train"), load_clips(out, "eval")
    assert train.count() == c["clips"]["train"] and evaluation.count() == c["clips"]["eval"]
    train_ids = {r["identity"] for r in train.select_columns(["identity"]).take_all()}
    eval_ids = {r["identity"] for r in evaluation.select_columns(["identity"]).take_all()}
    assert train_ids and eval_ids and not train_ids & eval_ids
    batch = next(iter(train.select_columns(["latents", "audio", "motion", "refs", "mouth"]).iter_torch_batches(batch_size=3)))
    assert tuple(batch["latents"].shape) == (3, CLIP, 4, 8, 8)
    assert tuple(batch["audio"].shape) == (3, CLIP + 4, 4, 32)
    assert tuple(batch["motion"].shape) == (3, 2, 4, 8, 8) and tuple(batch["refs"].shape) == (3, 4, 4, 8, 8)
    assert np.allclose(batch["mouth"].numpy(), 0.5)
    # the manifest records the shapes a reader finds: no need to open the bundle to learn them
    assert manifest.features == FeatureShapes(latent_channels=4, latent_size=8, audio_layers=4, audio_feature_dim=32)
    assert manifest.architecture() == {"input_size": 8, "in_channels": 4, "num_frames": CLIP, "num_motion_frames": 2,
                                       "audio_window": 5, "audio_layers": 4, "audio_feature_dim": 32}

    # re-run: nothing to do, shards untouched
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = run(raw, out, bundle, stride=4)
    assert again.last_run["processed"] == 0 and again.counts()["done"] == 7 and again.features == manifest.features
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == mtimes
    # a new video: only it is processed
    talking_video(raw / "spk9.mp4", 20, seed=9, identity="spk9")
    try:
        third = run(raw, out, bundle, stride=4)
        assert third.last_run["processed"] == 1 and third.counts()["done"] == 8
    finally:
        (raw / "spk9.mp4").unlink()
        (raw / "spk9.json").unlink()


def test_whisper_features_are_computed_once_into_the_shards(ray_local, raw, tmp_path):
    """A bundle with a Whisper encoder: the tokenizer actors write its per-frame states (2 steps ×
    (layers + 1) rows) into the shards, the same as the encoder gives for the video's own audio, with
    the window's context frames; the manifest sizes the transformer from them."""
    import torch

    from letstalk.audio import tiny_whisper_encoder
    from letstalk.media import load_audio
    from letstalk.pipeline import LetsTalkPipeline
    from letstalk.transformer import LetsTalkTransformer
    from letstalk.vae import tiny_codec
    from letstalk_platform.data import load_clips

    encoder = tiny_whisper_encoder(hidden_size=32, num_layers=2, context_steps=10)
    torch.manual_seed(0)
    transformer = LetsTalkTransformer.from_preset("tiny", audio_layers=6, audio_feature_dim=32)
    bundle = LetsTalkPipeline(transformer, tiny_codec(0), encoder).save_pretrained(tmp_path / "whisper-bundle")
    one = tmp_path / "one"
    one.mkdir()
    for name in ("spk1.mp4", "spk1.json"):
        (one / name).write_bytes((raw / name).read_bytes())
    manifest = run(one, tmp_path / "shards", bundle, stride=8, eval_fraction=0.0)
    assert manifest.counts()["done"] == 1
    assert manifest.features == FeatureShapes(latent_channels=4, latent_size=8, audio_layers=6, audio_feature_dim=32)
    rows = sorted(load_clips(tmp_path / "shards", "train").take_all(), key=lambda r: r["start"])
    assert [r["start"] for r in rows] == [0, 8, 16, 24, 32]  # 45 frames, 8-frame clips every 8
    states = encoder.hidden_states(load_audio(raw / "spk1.mp4", 16000), 45)  # (45, 6, 32)
    for r in rows:
        s = r["start"]
        want = states[np.clip(np.arange(s - 2, s + CLIP + 2), 0, 44)]  # ±2 frames of context, clamped
        stored = np.asarray(r["audio"], np.float32)  # float16 in the shards
        assert np.abs(stored - want.numpy()).max() <= 2e-3 * np.abs(want.numpy()).max() + 1e-3, s


def test_bad_inputs_are_recorded_and_good_ones_processed(ray_local, bundle, tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    talking_video(d / "good.mp4", 40, seed=1)
    talking_video(d / "good30fps.mp4", 48, seed=2, fps=30)  # resampled to 25 fps
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=97x71:rate=25:duration=2", "-f", "lavfi", "-i",
           "sine=frequency=300:sample_rate=16000:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv444p",
           "-c:a", "aac", "-shortest", str(d / "odd_size.mp4"))
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=3", "-f", "lavfi", "-i",
           "sine=frequency=300:sample_rate=16000:duration=3", "-vf", "select='not(mod(n\\,3))'",
           "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(d / "vfr.mp4"))
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:size=80x80:rate=25:duration=2", "-f", "lavfi", "-i",
           "sine=frequency=200:sample_rate=16000:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-shortest", str(d / "flat.mp4"))  # no face anywhere
    good = (d / "good.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(good[: len(good) // 3])
    write_video(d / "silent_track.mp4", [draw_portrait(64)] * 30, FPS, audio=None)  # no audio stream
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:sample_rate=16000:duration=2", "-c:a", "aac",
           str(d / "audio_only.mp4"))
    (d / "notes.mp4").write_text("this is text")
    (d / "empty.mp4").write_bytes(b"")
    talking_video(d / "short.mp4", 5, seed=3)

    manifest = run(d, tmp_path / "shards", bundle)
    by_name = {Path(e.path).name: e for e in manifest.inputs}
    assert {n for n, e in by_name.items() if e.status == "done"} == {"good.mp4", "good30fps.mp4", "odd_size.mp4",
                                                                    "vfr.mp4", "flat.mp4"}
    assert by_name["good30fps.mp4"].clips == 48 * FPS // 30 // CLIP  # 40 frames at 25 fps -> 5 clips
    reasons = {n: e.reason for n, e in by_name.items() if e.status != "done"}
    assert set(e.status for e in by_name.values()) == {"done", "failed"}
    assert "no audio stream" in reasons["silent_track.mp4"]
    assert "no video stream" in reasons["audio_only.mp4"]
    assert "shorter than one clip" in reasons["short.mp4"]
    for name in ("truncated.mp4", "notes.mp4", "empty.mp4"):
        assert reasons[name] and "\n" not in reasons[name]
    assert by_name["flat.mp4"].status == "done" and by_name["flat.mp4"].face_found is False  # centre crop
    assert all(isinstance(e.face_found, bool) for e in by_name.values())
    # re-running retries only the failed inputs
    again = run(d, tmp_path / "shards", bundle)
    assert again.last_run["processed"] == len(reasons)


def test_load_clips_ignores_unlisted_files(ray_local, raw, bundle, tmp_path):
    from letstalk_platform.data import load_clips

    out = tmp_path / "shards"
    manifest = run(raw, out, bundle)
    (out / "train" / ".half.parquet.part").write_bytes(b"PAR1 half written")
    (out / "train" / "stray.parquet").write_bytes(b"garbage")
    assert load_clips(out, "train").count() == manifest.clip_count("train")
    with pytest.raises(ValueError, match="split must be"):
        load_clips(out, "test")
    with pytest.raises(ValueError, match="no manifest.json"):
        load_clips(tmp_path, "train")


def test_a_registry_model_tokenizes_as_its_folder(ray_local, raw, bundle, tmp_path):
    """`model: models:/NAME@ALIAS`: the driver and each tokenizer actor download the registered bundle
    to their node's cache; the shards are cut with the same codecs as from the folder."""
    from letstalk.artifacts import dir_fingerprint
    from letstalk_platform.tracking import register_bundle, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_bundle(uri, start_run(uri, "pp-test", "tiny", {}), bundle, "pp-tiny", "production")
    manifest = run(raw, tmp_path / "shards", "models:/pp-tiny@production", mlflow_uri=uri, limit=2)
    assert manifest.counts()["done"] == 2
    assert manifest.models == {name: dir_fingerprint(bundle / name) for name in ("vae", "audio_encoder")}
    assert Path(manifest.bundle) != bundle and (Path(manifest.bundle) / "pipeline.json").is_file()
    with pytest.raises(ValueError, match="pp-tiny@nosuch: not in the registry"):
        run(raw, tmp_path / "other", "models:/pp-tiny@nosuch", mlflow_uri=uri)


def test_old_manifests_and_changed_codecs(ray_local, bundle, tmp_path):
    """A version-1 manifest: readers stop with the re-run command, and the re-run reuses its shards.
    Codecs that changed since tokenizing: shards are redone, and a bundle is never exported with them."""
    import shutil

    import torch

    from letstalk.vae import tiny_codec

    raw, out = tmp_path / "raw", tmp_path / "shards"
    raw.mkdir()
    for i in range(2):
        talking_video(raw / f"s{i}.mp4", 16, seed=i, identity=f"s{i}")
    first = run(raw, out, bundle)
    old = first.to_dict() | {"schema_version": 1, "models": {"vae": str(bundle / "vae")}}
    del old["features"], old["bundle"], old["tensor_columns"]
    old["inputs"] = [e | {"status": "ok"} for e in old["inputs"]]
    (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ArtifactError, match=f"version 1.*re-run jobs/preprocess.py --input {raw} .*--output {out}"):
        ShardManifest.load(out)
    again = run(raw, out, bundle)
    assert again.last_run["processed"] == 0 and again.features == first.features  # shapes read from the shards

    changed = tmp_path / "bundle2"
    shutil.copytree(bundle, changed)
    tiny_codec(seed=1).save_pretrained(changed / "vae")
    redone = run(raw, out, changed)
    assert redone.last_run["processed"] == 2 and redone.models["vae"] != first.models["vae"]
    # a checkpoint (transformer + state) exports with the codecs that made its shards ...
    ckpt = tmp_path / "checkpoint_000000007"
    shutil.copytree(bundle / "transformer", ckpt / "transformer")
    CheckpointState(step=7, data_position=None, world_size=1, target=ClipTarget(True, 4.0)).save(ckpt)
    from letstalk.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(export_bundle(ckpt, redone, tmp_path / "exported"))
    assert pipe.settings.residual and pipe.settings.residual_scale == 4.0
    shipped = pipe.codec.vae.state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in tiny_codec(seed=1).vae.state_dict().items())
    # ... and never with codecs swapped after tokenizing
    tiny_codec(seed=2).save_pretrained(changed / "vae")
    with pytest.raises(ArtifactError, match="changed since these shards were tokenized"):
        export_bundle(ckpt, redone, tmp_path / "exported2")
    with pytest.raises(ArtifactError, match="cannot be resumed exactly"):
        CheckpointState.load(ckpt)  # no data position: exportable, not resumable


def test_job_config_loader_gives_one_line_errors():
    """YAML + flags -> validated config (every cluster/ YAML is checked in test_cluster_configs.py)."""
    from letstalk_platform.preprocess import PreprocessConfig
    from letstalk_platform.runtime import load_config

    path = ROOT / "cluster" / "preprocess" / "demo.yaml"
    cfg = load_config(PreprocessConfig, path, {"stride": 2, "tokenizers": None})
    assert cfg.stride == 2 and cfg.tokenizers == yaml.safe_load(path.read_text())["tokenizers"]
    with pytest.raises(ValueError, match="invalid PreprocessConfig: stride: .*integer"):
        load_config(PreprocessConfig, path, {"stride": "often"})
    data = yaml.safe_load(path.read_text()) | {"typo_key": 1}
    with pytest.raises(ValueError, match="typo_key"):
        PreprocessConfig.model_validate(data)
    with pytest.raises(ValueError, match="not found"):
        load_config(PreprocessConfig, ROOT / "nope.yaml", {})


@pytest.mark.slow
def test_preprocess_job_from_a_shell(raw, bundle, tmp_path):
    out = tmp_path / "shards"
    run_job = subprocess.run([sys.executable, str(ROOT / "jobs" / "preprocess.py"), "--input", str(raw),
                              "--output", str(out), "--model", str(bundle), "--face-detector", "haar",
                              "--face-crop", "fixed"], capture_output=True, text=True)
    assert run_job.returncode == 0, run_job.stderr[-2000:]
    assert "7/7 videos done" in run_job.stdout
    assert ShardManifest.load(out).counts()["done"] == 7
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "preprocess.py"), "--input", str(raw)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "preprocess: error: invalid PreprocessConfig" in bad.stderr


def test_face_settings_are_checked_before_any_work(raw, bundle, tmp_path):
    """No face flags: the shipped small-face detector (RetinaFace + the shipped landmarker); a named
    model file that is missing stops the job at once with one line (no video is tried)."""
    from letstalk_platform.preprocess import PreprocessConfig, run_preprocess

    base = {"input": str(raw), "output": str(tmp_path / "out"), "model": str(bundle)}
    assert PreprocessConfig(**base).faces.detector == "retinaface"
    cfg = PreprocessConfig(**base, faces={"model": str(tmp_path / "missing.task")})
    with pytest.raises(ValueError, match="missing.task: file not found"):
        run_preprocess(cfg)
    assert not (tmp_path / "out" / "manifest.json").exists()
