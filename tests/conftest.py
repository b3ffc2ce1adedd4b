import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Real talking-head footage, portraits, speech and the face/VAD weights: internal test data that is
# never committed. Tests read it by path ($LETSTALK_REALDATA, else ../shared/realdata beside the
# checkout) and skip, saying why, where it is absent (a user's clone).
REALDATA = Path(os.environ.get("LETSTALK_REALDATA") or ROOT.parent / "shared" / "realdata")
FACE_MODEL = REALDATA / "weights" / "mediapipe_face_landmarker_v2_with_blendshapes.task"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real-media folder, or a skip naming what is missing."""
    if not (REALDATA / "videos").is_dir() or not FACE_MODEL.is_file():
        pytest.skip(f"real test media not found at {REALDATA} (set LETSTALK_REALDATA to the folder with "
                    f"videos/ and weights/)")
    return REALDATA


# drawn faces (the procedural data and talking_video): the built-in Haar cascade, one crop box per shot
DRAWN_FACES = {"detector": "haar", "crop": "fixed"}


def talking_video(path: Path, frames: int, seed: int, fps: float = 25, size: int = 96, identity: str | None = None):
    """A short mp4 (drawn face, speech-like audio); with `identity`, a sidecar JSON like the procedural data's."""
    from letstalk.media import write_video
    from letstalk.synthetic import draw_portrait, speech_like_audio

    face = draw_portrait(size, seed=seed)
    write_video(path, [np.roll(face, k % 4, axis=1) for k in range(frames)], fps,
                speech_like_audio(frames / fps, seed=seed))
    if identity is not None:
        path.with_suffix(".json").write_text(json.dumps({"identity": identity, "mouth_open": [0.5] * frames}))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray on 127.0.0.1 of this test run's own (never one that `ray start` left running on
    the machine), shared by the platform tests."""
    import ray

    from letstalk_platform.runtime import init_ray

    init_ray(num_cpus=2, own=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """The tiny model is far too small to split over threads; on a shared 2-core machine two OpenMP
    threads that wait for each other made its renders 20-50× slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """A random-initialised tiny render bundle (codec + audio encoder + transformer) on disk."""
    from letstalk.pipeline import LetsTalkPipeline

    path = tmp_path_factory.mktemp("bundle") / "tiny"
    return LetsTalkPipeline.init_tiny().save_pretrained(path)


def pytest_collection_modifyitems(config, items):
    """GPU cases run where CUDA is present; elsewhere they are reported as skipped (see -ra)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def printed_summary(stdout: str) -> dict:
    """The JSON summary a job prints (indented, from a line holding only '{'); worker log lines that
    Ray forwards may come before or after it."""
    start = stdout.index("\n{\n") + 1 if not stdout.startswith("{\n") else 0
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def live_pipeline(seed: int = 0, device: str = "cpu"):
    """The tiny pipeline with its weights perturbed: adaLN-Zero makes a fresh transformer output
    zeros, and a render would then not depend on the network at all."""
    from letstalk.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.init_tiny(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return pipe.to(device)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 endpoint; yields a VideoStore URI maker (credentials in the URI: any are accepted)."""
    moto_server = pytest.importorskip("moto.server", reason="moto (the dev extra) runs the local S3 server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()

    def uri(prefix: str) -> str:
        return (f"s3://test:secret@letstalk-videos/{prefix}?endpoint_override={host}:{port}&scheme=http"
                f"&region=us-east-1&allow_bucket_creation=true")

    yield uri
    server.stop()


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (Debian's postgresql binaries: initdb, pg_ctl; run as
    the `postgres` user when the tests run as root, which initdb refuses), as a SQLAlchemy URL."""
    import glob
    import os
    import shutil
    import socket
    import subprocess

    pytest.importorskip("psycopg", reason="psycopg (the dev extra) is the PostgreSQL driver")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not found[-1]:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    bin_dir = os.path.dirname(found[-1])
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    import tempfile
    from pathlib import Path

    data = Path(tempfile.mkdtemp(prefix="letstalk-postgres-"))  # not under pytest's tmp: its root is 0700
    if as_user:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, f"{bin_dir}/initdb", "-D", str(data / "db"), "-U", "letstalk", "--auth=trust"], **run)
    subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", str(data / "db"), "-w", "-l", str(data / "log"), "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], **run)
    yield f"postgresql+psycopg://letstalk@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", str(data / "db"), "-m", "immediate", "stop"],
                   capture_output=True, timeout=60)
    shutil.rmtree(data, ignore_errors=True)


def ldm_state_dict(vae) -> dict:
    """A diffusers AutoencoderKL's weights under the original LDM names (the layout of
    vae-ft-mse-840000-ema-pruned.safetensors): the inverse of diffusers' conversion, written here
    so that a wrong name or shape in it makes diffusers' loader fail the tests."""
    import re

    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.", k)  # LDM counts up blocks from the bottom
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
        k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
        k = k.replace(".conv_norm_out.", ".norm_out.")
        if ".attn_1." in k:  # LDM's attention is 1x1 convolutions
            k = (k.replace(".group_norm.", ".norm.").replace(".to_q.", ".q.").replace(".to_k.", ".k.")
                 .replace(".to_v.", ".v.").replace(".to_out.0.", ".proj_out."))
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[k] = value.contiguous().clone()
    return out
