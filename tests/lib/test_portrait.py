import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from letstalk.portrait import ImageError, PortraitCrop, crop_portrait, detect_face, load_image


def _rgb_ok(arr, shape):
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == shape


def _png_header(path, width, height, idat=b"not zlib data"):
    """A PNG whose header claims width x height, written in a few bytes (pixel data is garbage)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def astronaut():
    data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) provides a real face photo")
    return data.astronaut()  # (512, 512, 3) uint8, bundled in the wheel; the face is near (177..270, 67..160)


# --- load_image: modes -------------------------------------------------------------------------

def test_grayscale_loads_as_rgb(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (40, 1))  # (40, 64)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    _rgb_ok(out, (40, 64, 3))
    assert (out == gray[:, :, None]).all()


def test_rgba_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[:, :24] = (255, 0, 0, 255)  # opaque red
    rgba[:, 24:] = (0, 0, 0, 0)  # fully transparent black
    rgba[0, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png"))
    _rgb_ok(out, (32, 48, 3))
    assert (out[:, 24:] == 255).all()
    assert (out[1:, :24] == (255, 0, 0)).all()
    assert abs(int(out[0, 0, 0]) - 127) <= 1
    Image.fromarray(rgba[:, :, [0, 3]], "LA").save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png")[:, 24:] == 255).all()


def test_16bit_gradient_maps_to_full_8bit_range(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (20, 1))).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    out = load_image(tmp_path / "deep.png")
    _rgb_ok(out, (20, 256, 3))
    row = out[0, :, 0].astype(int)
    assert row.min() == 0 and row.max() == 255 and (np.diff(row) >= 0).all()
    assert len(np.unique(row)) > 250  # scaled, not clipped to a few values
    assert load_image(np.tile(ramp, (20, 1)))[0, 128, 0] in (127, 128)  # uint16 arrays are scaled too


def test_palette_cmyk_and_bilevel_load_as_rgb(tmp_path):
    pal = Image.new("P", (30, 20), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    _rgb_ok(out, (20, 30, 3))
    assert tuple(out[5, 5]) == (10, 200, 30) and tuple(out[0, 0]) == (0, 0, 0)
    pal.save(tmp_path / "pt.png", transparency=0)  # palette index 0 transparent
    assert tuple(load_image(tmp_path / "pt.png")[0, 0]) == (255, 255, 255)

    cmyk = Image.new("CMYK", (30, 20), (0, 0, 0, 0))  # no ink: white
    cmyk.paste((0, 0, 0, 255), (0, 0, 15, 20))  # full black ink on the left half
    cmyk.save(tmp_path / "c.tif")
    out = load_image(tmp_path / "c.tif")
    _rgb_ok(out, (20, 30, 3))
    assert (out[:, :15] == 0).all() and (out[:, 15:] == 255).all()
    cmyk.save(tmp_path / "c.jpg", quality=95)
    _rgb_ok(load_image(tmp_path / "c.jpg"), (20, 30, 3))

    Image.new("1", (30, 20), 1).save(tmp_path / "b.png")
    assert (load_image(tmp_path / "b.png") == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)  # red left half in stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(img).save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "o.jpg")
    _rgb_ok(out, (40, 20, 3))
    assert out[5, 10, 0] > 200 and out[35, 10, 0] < 50  # the red half is now on top


def test_array_and_pil_inputs():
    _rgb_ok(load_image(np.zeros((20, 30), np.uint8)), (20, 30, 3))
    floats = load_image(np.full((20, 30, 3), 0.5, np.float32))
    assert (floats == 128).all()
    rgba = np.zeros((20, 30, 4), np.uint8)  # all transparent
    assert (load_image(rgba) == 255).all()
    _rgb_ok(load_image(Image.new("LA", (30, 20))), (20, 30, 3))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((20, 30, 2), np.uint8))


# --- load_image: errors ------------------------------------------------------------------------

def _bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("this is not a picture\n")
    wav = b"RIFF" + struct.pack("<I", 36 + 800) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    (tmp_path / "voice.wav").write_bytes(wav + b"data" + struct.pack("<I", 800) + bytes(800))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noisy.save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[: len(data)])
    return {"notes.txt": "not a recognised image", "voice.wav": "not a recognised image", "empty.png": "empty",
            "folder.png": "directory", "missing.jpg": "not found", "cut.png": "could not decode"}


def test_bad_files_raise_one_line_image_errors(tmp_path):
    for name, problem in _bad_files(tmp_path).items():
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / name)
        msg = str(info.value)
        assert "\n" not in msg and name in msg and problem in msg, msg
        assert isinstance(info.value, ValueError)


def test_image_error_survives_pickling():  # errors cross process boundaries (Ray workers)
    err = pickle.loads(pickle.dumps(ImageError("a.png: file not found")))
    assert isinstance(err, ImageError) and str(err) == "a.png: file not found"


@pytest.mark.parametrize("side", [20_000, 10_000])  # PIL's bomb error (> 179 MP) and bomb warning (> 89 MP)
def test_huge_header_is_refused_before_decoding(tmp_path, side):
    path = _png_header(tmp_path / "huge.png", side, side)
    assert path.stat().st_size < 100
    with pytest.raises(ImageError, match="pixel limit") as info:
        load_image(path)
    assert "huge.png" in str(info.value) and "\n" not in str(info.value)


def test_pixel_limit_is_checked_on_the_header(tmp_path):
    path = _png_header(tmp_path / "big.png", 5000, 5000)  # 25 MP header, undecodable pixel data
    with pytest.raises(ImageError, match="could not decode"):
        load_image(path)  # under the default limit: decoding is attempted and fails
    with pytest.raises(ImageError, match="25,000,000 pixels, over the pixel limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)  # over the limit: refused before decoding
    Image.new("RGB", (100, 60)).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match="pixel limit of 5,000"):
        load_image(tmp_path / "small.png", max_pixels=5000)
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(np.zeros((100, 60, 3), np.uint8), max_pixels=5000)


def test_too_small_and_zero_size(tmp_path):
    Image.new("RGB", (15, 40)).save(tmp_path / "thin.png")
    with pytest.raises(ImageError, match="thin.png: image is 15x40, smaller than the 16-pixel minimum"):
        load_image(tmp_path / "thin.png")
    _rgb_ok(load_image(np.zeros((16, 16, 3), np.uint8)), (16, 16, 3))
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 30, 3), np.uint8))


# --- face detection and cropping ---------------------------------------------------------------

def _contains(outer, inner):
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def test_detect_face_finds_the_astronaut(astronaut):
    box = detect_face(astronaut)
    assert box is not None
    x0, y0, x1, y1 = box
    assert 60 <= x1 - x0 <= 160 and 60 <= y1 - y0 <= 160
    assert _contains(box, (200, 90, 250, 140))  # eyes, nose and mouth


def test_detect_face_maps_back_from_the_downscaled_copy(astronaut):
    # 1000x1600 canvas (downscaled 2.5x for detection) with the photo scaled 1.5x at (700, 150).
    big = np.asarray(Image.fromarray(astronaut).resize((768, 768), Image.Resampling.BICUBIC))
    canvas = np.full((1000, 1600, 3), 90, np.uint8)
    canvas[150:918, 700:1468] = big
    x0, y0, x1, y1 = detect_face(canvas)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    assert abs(cx - (700 + 1.5 * 223)) < 25 and abs(cy - (150 + 1.5 * 113)) < 25
    assert 100 <= x1 - x0 <= 240


def test_crop_portrait_centres_on_the_face(astronaut):
    crop = crop_portrait(astronaut)
    assert isinstance(crop, PortraitCrop) and crop.face_found
    _rgb_ok(crop.image, (256, 256, 3))
    x0, y0, x1, y1 = crop.box
    assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= 512 and y1 <= 512
    face = detect_face(astronaut)
    assert _contains(crop.box, face)
    assert x1 - x0 == round(1.8 * (face[2] - face[0]))
    small = crop_portrait(astronaut, size=64, margin=2.5)
    _rgb_ok(small.image, (64, 64, 3))
    assert small.box[2] - small.box[0] > x1 - x0


def test_crop_box_is_shifted_inside_and_shrunk(astronaut):
    corner = astronaut[40:, 150:]  # face close to the top-left corner
    crop = crop_portrait(corner, size=128, margin=1.8)
    assert crop.face_found and crop.box[0] >= 0 and crop.box[1] == 0
    assert _contains(crop.box, detect_face(corner))
    wide = crop_portrait(astronaut[40:200], margin=4.0)  # 160 px tall: box shrinks to the shorter side
    assert wide.face_found and wide.box[1] == 0 and wide.box[3] == 160 and wide.box[2] - wide.box[0] == 160
    _rgb_ok(wide.image, (256, 256, 3))


@pytest.mark.parametrize("kind", ["flat", "noise"])
def test_no_face_gives_centre_square(kind):
    rng = np.random.default_rng(0)
    image = np.full((300, 500, 3), 128, np.uint8) if kind == "flat" else rng.integers(0, 256, (300, 500, 3), np.uint8)
    assert detect_face(image) is None
    crop = crop_portrait(image)
    assert not crop.face_found and crop.box == (100, 0, 400, 300)
    _rgb_ok(crop.image, (256, 256, 3))
    tall = crop_portrait(image.transpose(1, 0, 2).copy(), size=100)
    assert tall.box == (0, 100, 300, 400) and tall.image.shape == (100, 100, 3)


def test_tiny_input_and_path_input(tmp_path):
    tiny = np.zeros((20, 30, 3), np.uint8)
    tiny[:, 5:25] = 200
    crop = crop_portrait(tiny)
    assert not crop.face_found and crop.box == (5, 0, 25, 20)
    assert crop.image.shape == (256, 256, 3) and (crop.image == 200).all()
    Image.fromarray(tiny).save(tmp_path / "tiny.png")
    assert crop_portrait(tmp_path / "tiny.png").box == (5, 0, 25, 20)
    with pytest.raises(ImageError):
        crop_portrait(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="size"):
        crop_portrait(tiny, size=0)
    with pytest.raises(ValueError, match="RGB"):
        detect_face(tiny[:, :, 0])
