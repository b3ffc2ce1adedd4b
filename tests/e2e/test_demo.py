"""A reduced run of the main job (jobs/demo.py): every stage of the real path, seconds-scale settings."""

import json

import pytest

from letstalk.artifacts import ShardManifest
from letstalk.media import probe


@pytest.mark.slow
@pytest.mark.heavy
def test_reduced_demo_runs_every_stage(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from letstalk_platform.demo import DemoConfig, run_demo

    out = tmp_path / "demo"
    result = run_demo(DemoConfig(out=str(out), videos=12, seconds=2.0, train_steps=2, batch_videos=1,
                                 eval_videos=2, steps=2, compare=[]))
    assert list(result["seconds"]) == ["dataset", "preprocess (Ray Data)", "train (Ray Train + DeepSpeed)",
                                       "render: HTTP endpoint + batch job (Ray Serve)",
                                       "evaluate (held-out identities)", "figures"]
    # one video through the batch job, one through the HTTP endpoint, each with its pictures
    names = sorted(result["videos"])
    assert len(names) == 2 and sum(n.endswith("-http") for n in names) == 1
    for name in names:
        info = probe(out / "videos" / f"{name}.mp4")
        assert abs(info.duration - 2.0) < 0.1 and info.has_audio
        assert (out / "videos" / f"{name}_sheet.png").stat().st_size > 1000
        assert (out / "videos" / f"{name}_mouth.png").stat().st_size > 1000
        assert -1 <= result["videos"][name]["sync_r"] <= 1
        assert result["videos"][name]["ground_truth_r"] > 0.8  # the measure works on the procedural videos
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"letstalk-demo@candidate", "ground truth"}
    assert rows["letstalk-demo@candidate"]["face_psnr"] is not None
    table = json.loads((out / "eval" / "table.json").read_text())
    held_out = len(ShardManifest.load(out / "shards").done("eval"))
    assert held_out >= 1 and table["protocol"]["videos"] == min(2, held_out)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert int(client.get_model_version_by_alias("letstalk-demo", "candidate").version) == 1
    assert "letstalk-demo@candidate" in (out / "results.md").read_text()
