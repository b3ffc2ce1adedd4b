"""letstalk.artifacts' training checkpoint state (state.json): a round trip, and the checkpoints written
before it held the settings an exact resume must share (their resume.json beside it, or nothing)."""

import json

import pytest

from letstalk.artifacts import ArtifactError, CheckpointState
from letstalk.diffusion import ClipTarget

SETTINGS = {"seed": 3, "data.shuffle": False, "data.batch_size": 4, "model.preset": "tiny"}


def test_checkpoint_state_round_trips_its_settings(tmp_path):
    state = CheckpointState(step=6, data_position=(1, 2), world_size=2, seed=3, shuffle=False,
                            target=ClipTarget(True, 4.0, "motion"), prediction="v_prediction", settings=SETTINGS)
    state.save(tmp_path)
    assert json.loads((tmp_path / "state.json").read_text())["settings"] == SETTINGS
    assert not (tmp_path / CheckpointState.LEGACY_SETTINGS_FILE).exists()
    assert CheckpointState.load(tmp_path) == state


def test_older_checkpoints_read_their_settings_from_resume_json_or_have_none(tmp_path):
    CheckpointState(step=6, data_position=(1, 2), world_size=2, seed=3).save(tmp_path)
    assert "settings" not in json.loads((tmp_path / "state.json").read_text())  # as before the field existed
    assert CheckpointState.load(tmp_path).settings is None  # before resume.json: none recorded
    (tmp_path / "resume.json").write_text(json.dumps(SETTINGS))  # what checkpoints wrote beside state.json
    assert CheckpointState.load(tmp_path).settings == SETTINGS
    assert CheckpointState.load(tmp_path, resumable=False).settings == SETTINGS
    # state.json's own settings come first
    CheckpointState(step=6, data_position=(1, 2), world_size=2, settings={"seed": 5}).save(tmp_path)
    assert CheckpointState.load(tmp_path).settings == {"seed": 5}


def test_a_checkpoint_without_state_json_is_refused_in_one_line(tmp_path):
    (tmp_path / "resume.json").write_text(json.dumps(SETTINGS))
    with pytest.raises(ArtifactError, match="is not a training checkpoint .no state.json."):
        CheckpointState.load(tmp_path)
