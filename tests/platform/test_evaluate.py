"""The evaluate job end to end: procedural videos -> shards (real Ray Data) -> a tiny model from a bundle dir
and from the MLflow registry -> the metrics table on stdout, on disk and in a real sqlite MLflow store."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from letstalk import metrics, synthetic

from conftest import DRAWN_FACES

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))


@pytest.fixture(scope="module")
def shards(ray_local, bundle, tmp_path_factory):
    """3 procedural videos of 1.2 s at 64 px, all in the eval split."""
    from letstalk_platform.preprocess import PreprocessConfig, run_preprocess

    d = tmp_path_factory.mktemp("evaldata")
    synthetic.make_dataset(d / "raw", videos=3, seconds=1.2, seed=5, size=64, progress=False)
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
        for key in ("fid", "fvd", "efid", "ssim", "psnr", "face_ssim", "face_psnr", "sync", "sync_control"):
            assert isinstance(row[key], float) and np.isfinite(row[key]), (key, row)
        assert row["fid"] > 0 and row["fvd"] > 0 and -1 <= row["ssim"] < 0.9  # a random model is far from the data
        assert row["notes"]["efid_kind"].startswith("Deep3DFaceRecon")
    # the same weights, seed and sampler from the registry render the same videos
    assert first["fid"] == pytest.approx(second["fid"], rel=1e-6) and first["ssim"] == pytest.approx(second["ssim"])
    # ground truth: the weights-free lip-sync measure sees its audio-driven mouth
    assert truth["sync"] > 0.7 and truth["sync"] > truth["sync_control"] + 0.2
    assert "nan" not in stdout.lower() and "nan" not in (out / "table.md").read_text().lower()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("letstalk-eval")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    for run in runs:
        assert {"fid", "fvd", "ssim", "psnr", "efid", "sync"} <= set(run.data.metrics)
        assert run.data.params["portrait_fusion"] == "symbiotic"
        table = client.download_artifacts(run.info.run_id, "eval/table.md", str(tmp_path / run.info.run_id))
        assert "| tiny@a |" in Path(table).read_text()


def test_evaluate_without_weights_says_what_is_missing(shards, bundle, uri):
    from letstalk_platform.evaluate import EvalConfig, evaluate_models

    report = evaluate_models(EvalConfig(models=[str(bundle)], data=str(shards), steps=2, max_videos=2,
                                        mlflow_uri=uri, experiment="no-weights"))
    row = report.rows[0]
    assert row["fid"] is None and row["fvd"] is None
    assert "no weights: pass --inception" in row["notes"]["fid"] and "--i3d" in row["notes"]["fvd"]
    assert row["efid"] is not None and row["notes"]["efid_kind"].startswith("PROXY")
    assert "PROXY" in report.markdown and "not computed (no weights" in report.markdown
    assert "blinks_per_min: not computed (eyes too small" in report.markdown
    assert report.protocol["videos"] == 2 and len(report.run_ids) == 1


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
