"""The evaluate job end to end: procedural videos -> shards (real Ray Data) -> a tiny model from a bundle dir
and from the MLflow registry -> the metrics table on stdout, on disk and in a real sqlite MLflow store; and
the demo model on real talking heads (--reference-videos, skipped without the real test media)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from letstalk import metrics, synthetic

from conftest import DRAWN_FACES, FACE_MODEL

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))


@pytest.fixture(scope="module")
def shards(ray_local, bundle, tmp_path_factory):
    """3 procedural videos of 2.2 s (55 frames: long enough for a sync figure) at 64 px, all in the eval split."""
    from letstalk_platform.preprocess import PreprocessConfig, run_preprocess

    d = tmp_path_factory.mktemp("evaldata")
    synthetic.make_dataset(d / "raw", videos=3, seconds=2.2, seed=5, size=64, progress=False)
    run_preprocess(PreprocessConfig(input=str(d / "raw"), output=str(d / "shards"), model=str(bundle),
                                    eval_fraction=1.0, faces=DRAWN_FACES))
    return d / "shards"


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One sqlite MLflow store for the module (creating a store costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random feature networks saved in the published formats (see test_metrics)."""
    from test_metrics import TinyI3D, TinyInception

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.jit.script(TinyInception()).save(str(d / "inception.pt"))
    torch.jit.script(TinyI3D()).save(str(d / "i3d.pt"))
    recon = metrics.FaceReconNet(width=8, blocks=(1, 1, 1, 1), planes=(4, 8, 8, 8))
    torch.save({"net_recon": recon.state_dict()}, d / "epoch_20.pth")
    return d


def test_evaluate_job_end_to_end(shards, bundle, weights, uri, tmp_path, capsys):
    import evaluate as job

    from letstalk_platform import tracking

    run_id = tracking.start_run(uri, "train", "r", {})
    tracking.register_bundle(uri, run_id, bundle, "tiny", "a")
    out = tmp_path / "eval"
    rc = job.main(["--model", str(bundle), "--models", "tiny@a", "--data", str(shards), "--out", str(out),
                   "--mlflow-uri", uri, "--steps", "3", "--inception", str(weights / "inception.pt"),
                   "--i3d", str(weights / "i3d.pt"), "--face-recon", str(weights / "epoch_20.pth")])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "| model | portrait fusion | audio fusion | FID ↓ | FVD ↓ | SSIM ↑" in stdout
    assert "| tiny@a | symbiotic | direct |" in stdout and "| ground truth |" in stdout
    data = json.loads((out / "table.json").read_text())
    assert data["protocol"]["videos"] == 3 and data["protocol"]["frames"] == 16
    first, second, truth = data["rows"]
    for row in (first, second):
        for key in ("fid", "fvd", "efid", "ssim", "psnr", "face_ssim", "face_psnr"):
            assert isinstance(row[key], float) and np.isfinite(row[key]), (key, row)
        assert row["fid"] > 0 and row["fvd"] > 0 and -1 <= row["ssim"] < 0.9  # a random model is far from the data
        assert row["notes"]["efid_kind"].startswith("Deep3DFaceRecon")
        # the random model's frames against the real mouths: a finite ratio, not the truth's 1
        assert 0 < row["mouth_sharpness"] and abs(row["mouth_sharpness"] - 1) > 0.05, row["mouth_sharpness"]
    assert truth["mouth_sharpness"] == 1.0 and "mouth sharpness (1 = real)" in stdout
    # the same weights, seed and sampler from the registry render the same videos
    assert first["fid"] == pytest.approx(second["fid"], rel=1e-6) and first["ssim"] == pytest.approx(second["ssim"])
    # 16 frames are too few for a lip-sync figure: "–" with the reason, not a number
    for row in (first, second, truth):
        assert row["sync"] is None and row["sync_control"] is None
    assert "| – (16 frames < 50) | – (16 frames < 50) |" in stdout
    assert "sync: not computed (16 frames < 50" in stdout
    assert "nan" not in stdout.lower() and "nan" not in (out / "table.md").read_text().lower()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("letstalk-eval")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    for run in runs:
        assert {"fid", "fvd", "ssim", "psnr", "efid"} <= set(run.data.metrics)
        assert "sync" not in run.data.metrics  # not computed: not logged
        assert run.data.params["portrait_fusion"] == "symbiotic"
        table = client.download_artifacts(run.info.run_id, "eval/table.md", str(tmp_path / run.info.run_id))
        assert "| tiny@a |" in Path(table).read_text()


def test_evaluate_without_weights_says_what_is_missing(shards, bundle, uri):
    from letstalk_platform.evaluate import EvalConfig, evaluate_models

    report = evaluate_models(EvalConfig(models=[str(bundle)], data=str(shards), steps=2, max_videos=2, frames=50,
                                        mlflow_uri=uri, experiment="no-weights"))
    row = report.rows[0]
    assert row["fid"] is None and row["fvd"] is None
    assert "no weights: pass --inception" in row["notes"]["fid"] and "--i3d" in row["notes"]["fvd"]
    assert row["efid"] is not None and row["notes"]["efid_kind"].startswith("PROXY")
    assert "PROXY" in report.markdown and "not computed (no weights" in report.markdown
    assert "blinks_per_min: not computed (eyes too small" in report.markdown
    assert report.protocol["videos"] == 2 and len(report.run_ids) == 1
    # 50 frames give a sync figure; ground truth: the weights-free measure sees its audio-driven mouth
    row, truth = report.rows
    assert isinstance(row["sync"], float) and isinstance(row["sync_control"], float)
    assert truth["sync"] > 0.7 and truth["sync"] > truth["sync_control"] + 0.2
    assert "frames < 50" not in report.markdown


def test_evaluate_split_and_default_mlflow_store(shards, bundle, tmp_path, monkeypatch):
    """--split picks the shard folder's videos; without --mlflow-uri the store lands under --out."""
    import evaluate as job

    from letstalk_platform.evaluate import EvalConfig, load_eval_videos

    data = tmp_path / "shards"  # the same videos, one of them moved to the train split
    data.mkdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["inputs"][0]["split"] = "train"
    (data / "manifest.json").write_text(json.dumps(manifest))
    counts = {split: len(load_eval_videos(EvalConfig(models=["m"], data=str(data), split=split, mlflow_uri="x"))[0])
              for split in ("eval", "train", "all")}
    assert counts == {"eval": 2, "train": 1, "all": 3}

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    assert job.main(["--model", str(bundle), "--data", str(data), "--split", "all", "--steps", "2",
                     "--out", str(out)]) == 0
    assert json.loads((out / "table.json").read_text())["protocol"]["videos"] == 3
    assert (out / "mlflow.db").is_file() and list(cwd.iterdir()) == []
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("letstalk-eval").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["split"] == "all"


def test_eval_config_sources_and_mlflow_default(tmp_path, monkeypatch):
    from letstalk_platform.evaluate import NO_OUT_MLFLOW_DB, EvalConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert EvalConfig(models=["m"], data="d", out=str(tmp_path)).mlflow_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert EvalConfig(models=["m"], data="d").mlflow_uri == f"sqlite:///{NO_OUT_MLFLOW_DB}"
    assert NO_OUT_MLFLOW_DB.is_absolute() and Path.cwd() not in NO_OUT_MLFLOW_DB.parents
    assert EvalConfig(models=["m"], data="d", out="o", mlflow_uri="sqlite:///x.db").mlflow_uri == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert EvalConfig(models=["m"], data="d", out="o").mlflow_uri == "http://mlflow:5000"
    with pytest.raises(ValueError, match="nothing to evaluate on"):
        EvalConfig(models=["m"])
    from letstalk.faces import LANDMARKER

    assert EvalConfig(models=["m"], reference_videos="videos/").face_model == str(LANDMARKER)  # the shipped one
    assert LANDMARKER.is_file()
    assert EvalConfig(models=["m"], reference_videos="v/", face_model="f.task").data is None


def test_reference_rows_below_min_sync_frames():
    """A 37-frame video (1.5 s) gets "–" with the reason in its sync columns, never 0.000; LMD,
    the face-found share and the ground-truth row's figures that need no length stay."""
    from letstalk.clips import ClipSpec
    from letstalk.faces import LIP_POINTS
    from letstalk_platform.evaluate import (EvalVideo, reference_table, reference_truth_row,
                                            score_reference_video)

    rng = np.random.default_rng(0)

    def track(n):
        lips = rng.normal(0, 0.05, (n, len(LIP_POINTS), 2))
        return metrics.MouthTrack(0.05 + 0.02 * rng.random(n), rng.random(n), lips, np.ones(n, bool))

    spec = ClipSpec(image_size=48, clip_frames=8)
    for n, short in ((37, True), (60, False)):
        video = EvalVideo("clip", "clip.mp4", np.zeros((n, 48, 48, 3), np.uint8),
                          synthetic.speech_like_audio(n / 25, seed=1), None)
        real = track(n)
        row = {"model": "m"} | score_reference_video(track(n), real, video, spec, max_lag=3)
        truth = reference_truth_row(real, video, spec, max_lag=3)
        assert row["lmd"] > 0 and row["face_found"] == 1.0 and truth["face_found"] == 1.0
        assert row["identity"] is None and row["cells"]["identity"] == "– (no face-embedding model)"
        assert truth["cells"]["mouth_r"] == "– (itself)" and truth["mouth_r"] is None
        table = reference_table([row, truth], {"max_seconds": n / 25, "videos": 1, "source": "x", "size": 48,
                                               "fps": 25, "sampler": "ddim", "steps": 2, "guidance": 1.0,
                                               "seed": 0, "mouth_min_side": 256, "max_lag": 3})
        if short:
            assert row["mouth_r"] is None and row["audio_r"] is None and truth["mouth_control"] is None
            assert row["cells"]["mouth_r"] == "– (37 frames < 50)"
            assert "| clip | m | 37 | – (37 frames < 50) | – (37 frames < 50) | – (37 frames < 50) |" in table
            assert "0.000" not in table
        else:
            assert isinstance(row["mouth_r"], float) and isinstance(truth["mouth_control"], float)
            assert isinstance(row["audio_r"], float) and "frames <" not in table


@pytest.mark.slow
def test_evaluate_on_real_footage(realdata, tmp_path):
    """The demo model on the first 3 s of two real talking heads with their own audio, from a shell:
    per video a model row and a ground-truth row with the landmark figures; the MLflow store lands
    under --out."""
    folder = tmp_path / "footage"  # a folder of links: the media stays where it is
    folder.mkdir()
    for name in ("styletalk_obama1", "styletalk_obama2"):
        (folder / f"{name}.mp4").symlink_to(realdata / "videos" / f"{name}.mp4")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"),
                          "--model", str(ROOT / "letstalk" / "models" / "demo"),
                          "--reference-videos", str(folder), "--face-model", str(FACE_MODEL), "--max-seconds", "3",
                          "--steps", "2", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    print(run.stdout)
    assert "| video | model | frames | mouth r ↑ | mouth control | lag | LMD ↓ | audio r |" in run.stdout
    data = json.loads((out / "table.json").read_text())
    assert data["rows"] == [] and data["reference"]["protocol"]["videos"] == 2
    rows = data["reference"]["rows"]
    model_rows = [r for r in rows if r["model"] == "demo" and not r["video"].startswith("mean")]
    truth_rows = [r for r in rows if r["model"] == "ground truth" and not r["video"].startswith("mean")]
    assert [r["video"].split("-")[0] for r in model_rows] == ["styletalk_obama1", "styletalk_obama2"]
    assert len(truth_rows) == 2 and len(rows) == 6  # + a mean row each
    for r in model_rows:
        assert r["frames"] == 75 and r["face_found"] > 0.9
        assert -1 <= r["mouth_r"] <= 1 and -1 <= r["mouth_control"] <= 1 and 0 <= r["mouth_lag"] <= 3
        assert 0 < r["lmd"] < 20 and -1 <= r["audio_r"] <= 1 and r["identity"] is None
        assert f"| {r['video']} | demo | 75 | {r['mouth_r']:.3f} | {r['mouth_control']:.3f} |" in run.stdout
    for r in truth_rows:
        assert r["face_found"] > 0.9 and -1 <= r["mouth_control"] <= 1 and -1 <= r["audio_r"] <= 1
        assert f"| {r['video']} | ground truth | 75 | – (itself) | {r['mouth_control']:.3f} |" in run.stdout
    assert "– (no face-embedding model)" in run.stdout and "nan" not in run.stdout.lower()
    assert (out / "mlflow.db").is_file() and not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run_info,) = client.search_runs([client.get_experiment_by_name("letstalk-eval").experiment_id])
    assert {"real_mouth_r", "real_mouth_control", "real_lmd", "real_audio_r", "real_face_found"} <= set(
        run_info.data.metrics)


def test_evaluate_bad_input(shards, bundle, uri, tmp_path, capsys):
    import evaluate as job

    uri = ["--mlflow-uri", uri]
    assert job.main(["--model", str(bundle), "--data", str(tmp_path), *uri]) == 2
    assert "evaluate: error:" in capsys.readouterr().err
    assert job.main(["--model", str(bundle), "--data", str(shards), "--frames", "500", *uri]) == 2
    assert "no eval video has 500 usable frames" in capsys.readouterr().err
    assert job.main(["--model", str(tmp_path / "nope"), "--data", str(shards), *uri]) == 2
    assert "neither a bundle folder" in capsys.readouterr().err
    assert job.main(["--data", str(shards), *uri]) == 2
    assert "models" in capsys.readouterr().err
    assert job.main(["--model", str(bundle), "--data", str(shards), "--i3d", str(tmp_path / "x.pt"), *uri]) == 2
    assert "I3D weights" in capsys.readouterr().err
    assert job.main(["--model", str(bundle), "--reference-videos", str(shards.parent / "raw"), "--face-model",
                     str(tmp_path / "none.task"), *uri]) == 2
    assert "face landmarker model not found" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_job_from_a_shell(shards, bundle, uri, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--model", str(bundle), "--data",
                          str(shards), "--debug-videos", "1", "--mlflow-uri", uri, "--experiment", "shell"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| ground truth |" in run.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--data", str(shards)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
