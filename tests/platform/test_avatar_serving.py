"""A re-voicing avatar (letstalk.footage) through the platform: the render worker, the HTTP API and the
batch job, with the model taken from a real MLflow registry by its models:/ name. Requests give the
speech alone; the video is the avatar's own footage, at its size, speaking it."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from ray import serve

from conftest import DRAWN_FACES, talking_video
from letstalk.media import load_video_frames
from test_serve import AUTH, TOKEN, free_port, load_job, png_bytes, post, wav_bytes, wait_done

STEPS = {"steps": 1, "sampler": "ddim"}


@pytest.fixture(scope="module")
def avatar(tmp_path_factory):
    """A random-initialised re-voicing avatar with its footage (30 frames of a drawn face at 128 px),
    registered as models:/avatar-me@candidate in a real MLflow store: (bundle folder, store URI)."""
    from letstalk.faces import FaceSettings
    from letstalk.footage import add_footage, load_footage
    from letstalk.pipeline import LetsTalkPipeline
    from letstalk_platform import tracking

    root = tmp_path_factory.mktemp("avatar")
    video = root / "me.mp4"
    talking_video(video, frames=30, seed=3, size=128)
    footage = load_footage(video, FaceSettings(**DRAWN_FACES))
    pipe = LetsTalkPipeline.init_avatar(footage.crops[:, ::4, ::4].copy(), preset="avatar-revoice")
    bundle = pipe.save_pretrained(root / "bundle")
    add_footage(bundle, video, DRAWN_FACES)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.register_bundle(uri, tracking.start_run(uri, "avatar", "me", {}), bundle, "avatar-me", "candidate")
    return bundle, uri


def test_the_render_worker_speaks_over_the_avatars_footage(avatar, bundle, tmp_path):
    from letstalk_platform.render import RenderWorker

    worker = RenderWorker(avatar[0])
    info = worker.info()
    assert info["mode"] == "revoice" and info["footage"] == {"frames": 30, "fps": 25, "width": 128, "height": 128}
    out = tmp_path / "talk.mp4"
    result = worker.render(None, wav_bytes(1.6, seed=4), STEPS, out=out)
    assert result["status"] == "done" and result["frames"] == 40 and result["options"]["paste_back"] is False
    assert load_video_frames(out).shape == (40, 128, 128, 3)  # the footage's size, looped to the speech's length
    with pytest.raises(ValueError, match="re-voicing avatar"):
        worker.render(png_bytes(), wav_bytes(0.5), STEPS, out=tmp_path / "x.mp4")
    # a portrait model asked for a render without a portrait: one line
    with pytest.raises(ValueError, match="give a portrait image"):
        RenderWorker(bundle).render(None, wav_bytes(0.5), STEPS, out=tmp_path / "y.mp4")
    assert RenderWorker(bundle).info()["mode"] == "portrait"


@pytest.fixture(scope="module")
def avatar_server(ray_local, avatar, tmp_path_factory):
    """The app as `jobs/serve.py --model models:/avatar-me@candidate` deploys it."""
    from letstalk_platform.serve import AppArgs, build_app

    args = AppArgs(model="models:/avatar-me@candidate", mlflow_uri=avatar[1], token=TOKEN, renderer_cpus=0,
                   max_jobs_per_replica=1, max_upload_mb=1, max_audio_seconds=20,
                   work_dir=str(tmp_path_factory.mktemp("serve")), defaults=STEPS)
    port = free_port()
    serve.shutdown()  # an earlier test's Serve would keep its own HTTP options
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="letstalk", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_the_http_api_and_the_batch_job_serve_an_avatar_by_its_registry_name(avatar_server, avatar, tmp_path):
    url = avatar_server
    model = requests.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()
    assert model["mode"] == "revoice" and model["footage"]["frames"] == 30
    r = post(url, audio=wav_bytes(1.0, seed=5))
    assert r.status_code == 202, r.text
    state, _ = wait_done(url, r.json()["id"], timeout=300)
    assert state["status"] == "done", state
    video = requests.get(f"{url}/v1/renders/{r.json()['id']}/video", headers=AUTH, timeout=30)
    assert video.status_code == 200
    (tmp_path / "api.mp4").write_bytes(video.content)
    frames = load_video_frames(tmp_path / "api.mp4")
    assert frames.shape == (25, 128, 128, 3)
    # outside the lower face the video is the footage itself (frame k is footage frame k: no loop needed)
    real = load_video_frames(avatar[0] / "avatar" / "footage.mp4")
    assert np.abs(frames[:, :40].astype(int) - real[:25, :40].astype(int)).mean() < 4
    # a portrait sent to an avatar: a 400 that says why; no audio: 422
    refused = post(url, portrait=png_bytes(), audio=wav_bytes(0.5))
    assert refused.status_code == 400 and "re-voicing avatar" in refused.json()["error"]
    assert post(url).status_code == 422

    # the batch job through the same app: rows give the audio alone; a bad row fails alone
    render_batch = load_job("render_batch")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "speech.wav").write_bytes(wav_bytes(0.8, seed=6))
    (tmp_path / "in" / "notes.wav").write_text("not audio")
    manifest = tmp_path / "in" / "rows.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"id": "hello", "audio": "speech.wav"}, {"id": "broken", "audio": "notes.wav"}]) + "\n")
    out = tmp_path / "out"
    assert render_batch.main(["--manifest", str(manifest), "--out", str(out), "--no-progress"]) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["done", "failed"] and "audio" in rows[1]["error"]
    assert load_video_frames(out / "hello.mp4").shape == (20, 128, 128, 3)


def test_batch_standalone_renders_an_avatar_from_the_registry(ray_local, avatar, tmp_path):
    """--standalone (Ray Data actors) with the avatar taken from the MLflow registry by alias."""
    render_batch = load_job("render_batch")
    (tmp_path / "speech.wav").write_bytes(wav_bytes(0.6, seed=7))
    manifest = tmp_path / "rows.csv"
    manifest.write_text(f"id,audio\nshort,{tmp_path / 'speech.wav'}\n")
    out = tmp_path / "out"
    assert render_batch.main(["--manifest", str(manifest), "--out", str(out), "--standalone", "--model",
                              "models:/avatar-me@candidate", "--mlflow-uri", avatar[1], "--steps", "1", "--sampler", "ddim",
                              "--cpus", "0.5", "--no-progress"]) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["done"], rows
    assert load_video_frames(out / "short.mp4").shape == (15, 128, 128, 3)


@pytest.mark.browser
@pytest.mark.slow
def test_the_web_page_speaks_with_an_avatar_in_a_real_browser(avatar_server, tmp_path):
    """The page with an avatar behind it: no portrait to choose (the picker and paste-back hidden, the model
    line says so), the speech alone renders the footage's 128 × 128 video, as long as the speech."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from test_serve import chromium

    (tmp_path / "speech.wav").write_bytes(wav_bytes(1.2, seed=8))
    browser = chromium()
    try:
        wait = WebDriverWait(browser, 120, poll_frequency=0.05)
        el = browser.find_element
        browser.get(f"{avatar_server}/")
        el(By.ID, "token").send_keys(TOKEN + "\t")
        wait.until(lambda b: el(By.ID, "model").text.startswith("Avatar"))
        assert "give the speech alone" in el(By.ID, "model").text
        assert not el(By.ID, "portrait-drop").is_displayed() and not el(By.ID, "paste-back").is_displayed()
        el(By.ID, "audio").send_keys(str(tmp_path / "speech.wav"))
        Select(el(By.ID, "quality")).select_by_value("ddim:10")
        el(By.ID, "stream").click()  # off: the finished video
        el(By.ID, "render").click()
        wait.until(lambda b: el(By.ID, "video").is_displayed() or el(By.ID, "error").is_displayed())
        assert not el(By.ID, "error").is_displayed(), el(By.ID, "error").text
        assert browser.execute_script("const v = document.getElementById('video'); return [v.videoWidth, "
                                      "v.videoHeight]") == [128, 128]
        duration = wait.until(lambda b: b.execute_script(
            "const v = document.getElementById('video'); return v.readyState >= 1 ? v.duration : null"))
        assert abs(duration - 1.2) <= 0.1, duration
    finally:
        browser.quit()
