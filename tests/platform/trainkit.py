"""What the Ray Train tests share: the tiny shards they train on and a run_training call on the tiny preset."""

from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import DRAWN_FACES, talking_video


def make_shards(bundle, tmp_path_factory) -> Path:
    """Five drawn speakers (60 frames each) preprocessed through Ray Data with `bundle`'s codecs."""
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
