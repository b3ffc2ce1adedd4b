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


def test_help_states_every_default():
    """`letstalk SUB --help` says each option's default (render: the model's own sampler and steps, else
    the DDIM-25 the API and batch use too)."""
    from letstalk.cli import build_parser
    from letstalk.diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)]
    assert set(sub.choices) >= {"render", "init-tiny", "demo", "make-dataset", "sample"}
    for name, command in sub.choices.items():
        text = " ".join(run_cli(name, "--help").stdout.split())
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert f"default: {action.default})" in text, (name, action.option_strings)
    # --steps/--sampler: the model's own (a distilled student's pipeline.json), else DDIM-25
    assert DEFAULT_STEPS == 25 and DEFAULT_SAMPLER == "ddim"
    render = " ".join(run_cli("render", "--help").stdout.split())
    assert render.count("else ddim 25") == 2, render


@pytest.mark.slow
def test_render_with_no_model_uses_the_demo_model_from_anywhere(tmp_path, portrait):
    """No --model, run from a folder outside the checkout: the shipped demo model at DDIM-25, and a
    note on stderr that it animates drawn faces only."""
    from letstalk.cli import SHIPPED

    if not (SHIPPED / "pipeline.json").is_file():
        pytest.skip(f"no shipped demo model at {SHIPPED}")
    sf.write(tmp_path / "speech.wav", speech_like_audio(0.4, seed=0), SR)
    run = subprocess.run([sys.executable, "-m", "letstalk.cli", "render", "portrait.png", "speech.wav", "-o", "t.mp4"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "t.mp4").exists() and "ddim × 25" in run.stderr
    assert f"the demo model ({SHIPPED}), trained on drawn faces" in run.stderr and "will not look real" in run.stderr
    # the shipped student by name, at its own 2 steps without --steps; a name this install lacks is one line
    student = subprocess.run([sys.executable, "-m", "letstalk.cli", "render", "portrait.png", "speech.wav", "-o",
                              "s.mp4", "--model", "demo-2step"], cwd=tmp_path, capture_output=True, text=True)
    assert student.returncode == 0, student.stderr
    assert (tmp_path / "s.mp4").exists() and "ddim × 2)" in student.stderr and "trained on drawn faces" in student.stderr
    demo = subprocess.run([sys.executable, "-m", "letstalk.cli", "demo", "--model", "demo-2step", "--seconds", "0.4",
                           "--out", "d"], cwd=tmp_path, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    assert (tmp_path / "d" / "talk.mp4").exists() and "ddim × 2)" in demo.stderr and not (tmp_path / "demo-2step").exists()


@pytest.mark.slow
def test_render_a_registry_model_from_a_fresh_shell(tmp_path, portrait):
    """`--model models:/NAME@ALIAS` with only MLFLOW_TRACKING_URI set: the CLI resolves it through the
    `models` resolver the platform registers (entry-point group letstalk.model_resolvers); an unknown
    alias is one line, exit 2."""
    import os

    from letstalk.pipeline import LetsTalkPipeline
    from letstalk_platform.tracking import register_bundle, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bundle = LetsTalkPipeline.init_tiny(seed=3).save_pretrained(tmp_path / "tiny")
    register_bundle(uri, start_run(uri, "cli-test", "tiny", {}), bundle, "cli-tiny", "production")
    sf.write(tmp_path / "speech.wav", speech_like_audio(0.4, seed=0), SR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW")} | {
        "MLFLOW_TRACKING_URI": uri, "HOME": str(tmp_path / "home")}  # the download cache under a fresh home
    out = tmp_path / "t.mp4"
    ok = subprocess.run([sys.executable, "-m", "letstalk.cli", "render", str(portrait), "speech.wav", "-o", str(out),
                         "--model", "models:/cli-tiny@production", "--steps", "2"], cwd=tmp_path, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.exists() and "10 frames" in ok.stdout and "the demo model" not in ok.stderr
    assert list((tmp_path / "home" / ".cache" / "letstalk" / "models").glob("cli-tiny-v1-*/pipeline.json"))
    bad = subprocess.run([sys.executable, "-m", "letstalk.cli", "render", str(portrait), "speech.wav", "-o",
                          str(tmp_path / "u.mp4"), "--model", "models:/cli-tiny@nosuch"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("letstalk: error")]
    assert bad.returncode == 2 and len(errors) == 1 and "cli-tiny@nosuch" in errors[0] and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_render_pastes_the_face_back_into_the_photo(tmp_path, portrait):
    """A portrait larger than the model's crop: by default the video has the portrait's size (the face
    composited back); --no-paste-back gives the crop alone; --max-side caps the size."""
    from letstalk.media import probe

    bundle = tmp_path / "bundle"
    assert run_cli("init-tiny", bundle).returncode == 0
    sf.write(tmp_path / "speech.wav", speech_like_audio(0.4, seed=0), SR)
    sizes = {}
    for name, extra in (("auto", []), ("off", ["--no-paste-back"]), ("capped", ["--max-side", "60"])):
        out = tmp_path / f"{name}.mp4"
        run = run_cli("render", portrait, tmp_path / "speech.wav", "-o", out, "--model", bundle, "--steps", "1", *extra)
        assert run.returncode == 0, run.stderr
        info = probe(out)
        sizes[name] = (info.width, info.height)
    from letstalk.pipeline import LetsTalkPipeline

    crop = LetsTalkPipeline.from_pretrained(bundle).image_size
    assert sizes == {"auto": (90, 120), "off": (crop, crop), "capped": (44, 60)}  # 90 x 120 portrait
