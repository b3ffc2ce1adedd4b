import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_platform_package_does_not_hide_stdlib_platform():
    assert not (ROOT / "platform" / "__init__.py").exists()
    import letstalk_platform

    assert Path(letstalk_platform.__file__).parent == ROOT / "platform" / "letstalk_platform"
    assert platform.system()  # Python's own module still works


def test_cli_sample_writes_a_png_strip(tmp_path):
    out = tmp_path / "strip.png"
    run = subprocess.run([sys.executable, "-m", "letstalk.cli", "sample", "--steps", "5", "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from PIL import Image

    img = Image.open(out)
    assert img.size == (8 * 8 * 8, 8 * 8)  # 8 frames of 8×8 latents, scaled 8×
    assert not (tmp_path / "strip.png.part").exists()
    bad = subprocess.run([sys.executable, "-m", "letstalk.cli", "sample", "--steps", "0", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "steps must be in 1..1000" in bad.stderr and "Traceback" not in bad.stderr
