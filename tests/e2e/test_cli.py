"""`letstalk render` from a shell, as a user runs it: a bundle made by the CLI, a video out, and a
one-line error (exit 2, nothing written) for each kind of bad input."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from letstalk.synthetic import speech_like_audio

SR = 16000


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "letstalk.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def portrait(tmp_path):
    path = tmp_path / "portrait.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_cli_from_a_shell(tmp_path, portrait):
    bundle = tmp_path / "bundle"
    assert run_cli("init-tiny", bundle).returncode == 0
    wav = tmp_path / "speech.wav"
    sf.write(wav, speech_like_audio(0.8, seed=0), SR)
    out = tmp_path / "talk.mp4"
    ok = run_cli("render", portrait, wav, "-o", out, "--model", bundle, "--steps", "2", "--sampler", "ddim")
    assert ok.returncode == 0, ok.stderr
    assert out.exists() and "20 frames" in ok.stdout and "no face found" in ok.stderr
    bad = tmp_path / "bad.mp4"
    for argv in ([wav, wav, "-o", bad], [portrait, portrait, "-o", bad], [portrait, wav, "-o", bad, "--steps", "0"],
                 [portrait, wav, "-o", tmp_path / "x.avi"], [portrait, tmp_path / "missing.wav", "-o", bad]):
        run = run_cli("render", "--model", bundle, "--steps", "1", *argv)
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.startswith("letstalk: error")]
        assert len(lines) == 1 and "Traceback" not in run.stderr
        assert not bad.exists()
    missing_model = run_cli("render", portrait, wav, "-o", bad, "--model", tmp_path / "nope")
    assert missing_model.returncode == 2 and "not a LetsTalk bundle" in missing_model.stderr
