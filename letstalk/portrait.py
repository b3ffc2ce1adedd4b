"""Portrait preparation for rendering: load any still image as RGB and crop it around the face.

Images are ``np.ndarray`` of shape (H, W, 3), dtype uint8, RGB order, throughout.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from .media import LimitExceeded

MIN_SIDE = 16  # smaller images carry too little detail to animate
_DETECT_MAX_SIDE = 640  # face detection runs on a copy no larger than this


class ImageError(ValueError):
    """A user-facing, one-line problem with an input image (names the file and the problem)."""


class ImageTooLarge(ImageError, LimitExceeded):
    """An image over the pixel limit it was loaded with."""


def _error(name: str, problem: object, kind: type[ImageError] = ImageError) -> ImageError:
    # Collapse whitespace so messages stay on one line even when they quote a library error.
    return kind(" ".join(f"{name}: {problem}".split()))


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """Scale an array of any numeric dtype to uint8 without clipping away its range."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise _error(name, f"unsupported pixel type {arr.dtype}")
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise _error(name, "pixel values are not finite")
    if np.issubdtype(arr.dtype, np.floating):
        scaled = arr * 255.0 if lo >= 0.0 and hi <= 1.0 else (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    elif arr.dtype == np.uint16 or (lo >= 0 and 255 < hi <= 65535):
        scaled = arr / 257.0  # 16-bit full scale: 65535 -> 255
    elif lo >= 0 and hi <= 255:
        scaled = arr
    else:
        scaled = (arr - lo) * (255.0 / max(hi - lo, 1.0))
    return np.rint(scaled).clip(0, 255).astype(np.uint8)


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) array of any numeric dtype -> (H, W, 3) uint8; alpha composited onto white."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise _error(name, f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {arr.shape}")
    arr = _to_uint8(arr, name)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:].astype(np.float32) / 255.0
        return np.rint(arr[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _from_pil(im: Image.Image, name: str) -> np.ndarray:
    """Decoded PIL image of any mode -> (H, W, 3) uint8."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _from_array(np.asarray(im), name)  # high bit depth: scale, don't let PIL clip
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        return np.array(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))
    return np.array(im.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def _check_size(width: int, height: int, max_pixels: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise _error(name, f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise _error(name, f"image is {width}x{height} = {width * height:,} pixels, "
                           f"over the pixel limit of {max_pixels:,}", ImageTooLarge)
    if min(width, height) < MIN_SIDE:
        raise _error(name, f"image is {width}x{height}, smaller than the {MIN_SIDE}-pixel minimum side")


def load_image(source: str | os.PathLike | np.ndarray | Image.Image, max_pixels: int = 40_000_000) -> np.ndarray:
    """Load a portrait as RGB.

    ``source`` is a file path, a numpy array ((H, W), (H, W, 1|3|4); uint8, uint16, bool or float in
    [0, 1]) or a PIL image. Transparency is composited onto white, 16-bit data is scaled (65535 -> 255),
    CMYK/palette/grayscale are converted and EXIF orientation is applied.
    Returns an (H, W, 3) uint8 RGB array. Raises ImageError for anything that is not a usable image.
    """
    if isinstance(source, np.ndarray):
        name = "<array>"
        if source.ndim >= 2:
            _check_size(int(source.shape[1]), int(source.shape[0]), max_pixels, name)
        return _from_array(source, name)
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        _check_size(*source.size, max_pixels, name)
        try:
            return _from_pil(ImageOps.exif_transpose(source), name)
        except ImageError:
            raise
        except Exception as e:
            raise _error(name, f"could not convert image ({e})") from e

    path = Path(os.fspath(source))
    name = str(path)
    if not path.exists():
        raise _error(name, "file not found")
    if path.is_dir():
        raise _error(name, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise _error(name, "file is empty (0 bytes)")
    # Pixel-count checks happen on the header, before any pixel is decoded. PIL's own bomb guard
    # fires inside Image.open; its warning is promoted to an error so both become an ImageError.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                _check_size(*im.size, max_pixels, name)
                im.load()
                return _from_pil(ImageOps.exif_transpose(im), name)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _error(name, f"image is over the pixel limit ({e})", ImageTooLarge) from e
        except Image.UnidentifiedImageError as e:
            raise _error(name, "not a recognised image file (expected PNG, JPEG, WebP, TIFF, BMP, ...)") from e
        except PermissionError as e:
            raise _error(name, f"cannot read file ({e.strerror})") from e
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
            raise _error(name, f"could not decode image data ({type(e).__name__}: {e})") from e


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class PortraitCrop:
    """A square portrait ready for rendering."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the crop in the source image (x1, y1 exclusive)
    face_found: bool  # False: no face detected, ``box`` is the centre square


_per_thread = threading.local()


def _face_cascade() -> cv2.CascadeClassifier:
    """This thread's detector: a CascadeClassifier is not safe to share (in 8 threads sharing one,
    93 of 160 detections returned another image's box), so each thread loads its own (~20 ms, once)."""
    cascade = getattr(_per_thread, "cascade", None)
    if cascade is None:
        cascade = _per_thread.cascade = _load_cascade()
    return cascade


def _load_cascade() -> cv2.CascadeClassifier:
    # Why a Haar cascade: its model file ships inside the opencv-python-headless wheel (no download,
    # works offline), it runs on CPU only, and it is deterministic. mediapipe 1.2.2 ships no models.
    # OpenCV 5 dropped the cascades (and CascadeClassifier) from the wheel, hence the explicit check.
    if not hasattr(cv2, "CascadeClassifier"):
        raise RuntimeError(f"OpenCV {cv2.__version__} has no Haar cascades; install opencv-python-headless<5")
    path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"could not load the face detector model {path}")
    return cascade


def _check_rgb(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {getattr(image, 'shape', type(image))}")


def detect_face(image: np.ndarray) -> tuple[int, int, int, int] | None:
    """Find the largest frontal face in an (H, W, 3) uint8 RGB image.

    Returns its box (x0, y0, x1, y1) in ``image`` pixel coordinates (x1, y1 exclusive), or None.
    """
    _check_rgb(image)
    h, w = image.shape[:2]
    scale = min(1.0, _DETECT_MAX_SIDE / max(h, w))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    faces, votes = _face_cascade().detectMultiScale2(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    if len(faces) == 0:
        return None
    # Real faces collect dozens of overlapping hits, spurious ones a handful: drop the weakly supported
    # boxes first so a large false positive (texture, clothing) cannot win "largest face".
    strong = [tuple(int(v) for v in f) for f, n in zip(faces, votes) if n >= max(votes) / 4]
    x, y, fw, fh = max(strong, key=lambda f: (f[2] * f[3], f))
    x0, y0 = max(0, round(x / scale)), max(0, round(y / scale))
    return x0, y0, min(w, max(x0 + 1, round((x + fw) / scale))), min(h, max(y0 + 1, round((y + fh) / scale)))


def crop_portrait(image: np.ndarray, size: int = 256, margin: float = 1.8) -> PortraitCrop:
    """Cut a face-centred square out of ``image`` and resize it to ``size`` x ``size``.

    ``image`` is an (H, W, 3) uint8 RGB array (anything ``load_image`` accepts also works). The square's
    side is ``margin`` x the face's longer side, centred slightly above the face centre so hair and chin
    fit; it is shifted to lie inside the image and shrunk to the image's shorter side if needed.
    Without a detected face the centre square of the shorter side is used and ``face_found`` is False.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        image = load_image(image)  # an RGB array is used as it is: it was decoded already
    h, w = image.shape[:2]
    face = detect_face(image)
    if face is None:
        side = min(h, w)
        x0, y0 = (w - side) // 2, (h - side) // 2
    else:
        fx0, fy0, fx1, fy1 = face
        side = max(1, min(h, w, round(margin * max(fx1 - fx0, fy1 - fy0))))
        cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2 - 0.1 * (fy1 - fy0)
        x0 = min(max(0, round(cx - side / 2)), w - side)
        y0 = min(max(0, round(cy - side / 2)), h - side)
    crop = image[y0:y0 + side, x0:x0 + side]
    if side != size:
        crop = Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS)
    return PortraitCrop(image=np.array(crop), box=(x0, y0, x0 + side, y0 + side), face_found=face is not None)
