"""Faces in real footage: detection, landmarks, the main speaker's track, shot cuts and crop boxes.

Three detectors, chosen by name (`make_detector`), never silently swapped:

* ``"retinaface"`` (the default): RetinaFace MobileNet-0.25 (`letstalk.retinaface`) finds the faces,
  small (from ~10-20 px) and anywhere in the frame; MediaPipe's FaceLandmarker then runs on a square crop
  around each one (478 landmarks + 52 blendshapes, among them ``jawOpen``), mapped back to the
  frame. Both models ship with the package (``letstalk/weights``): no flag, no download.
* ``"mediapipe"``: the FaceLandmarker alone, on the whole frame, in video mode: it finds faces with
  its own short-range detector, made for selfies, and misses small or off-centre faces (on a
  405x720 half-body clip with a 75-pixel face: 37/40 frames, 23/40 centred in a 960x720 frame,
  1/40 at its left edge). Kept for comparison.
* ``"haar"``: OpenCV's frontal-face Haar cascade that ships in the OpenCV wheel: boxes only, no
  landmarks (so no mouth measures).

`track_faces` turns per-frame detections into what preprocessing needs: the main face per frame
(largest and most central at the start of a shot, then followed by overlap), the shots (cuts
found from colour-histogram jumps between consecutive frames), and one square crop box per frame:
a fixed side per shot (``margin`` x the median face size) whose centre follows the face, smoothed
over ``smooth_frames``. Boxes are in source pixels, (x0, y0, x1, y1), x1/y1 exclusive; they are what
a paste-back needs later.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

DETECTORS = ("retinaface", "mediapipe", "haar")
CROP_MODES = ("track", "fixed")

# the FaceLandmarker model shipped with the package (Apache-2.0; letstalk/weights/SOURCE.md)
LANDMARKER = Path(__file__).resolve().parent / "weights" / "face_landmarker_v2_with_blendshapes.task"
# MediaPipe face-mesh indices: inner lips (upper 13, lower 14), forehead top 10, chin 152.
INNER_UPPER_LIP, INNER_LOWER_LIP, FOREHEAD, CHIN = 13, 14, 10, 152
# the lips' outline (outer and inner contour) of the 478-point mesh: the points LMD compares
LIP_POINTS = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267,
              269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)


class FaceModelError(ValueError):
    """A face model that cannot be used (missing file, missing package); one line."""


@dataclass(frozen=True, eq=False)
class Face:
    """One face in one frame, in that frame's pixel coordinates."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    landmarks: np.ndarray | None = None  # (478, 2) x, y pixels (mediapipe), None (haar)
    jaw_open: float = math.nan  # the jawOpen blendshape in [0, 1], NaN without blendshapes

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def size(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, y1 - y0)

    @property
    def aperture(self) -> float:
        """Inner-lip gap / face height (forehead to chin); NaN without landmarks."""
        if self.landmarks is None:
            return math.nan
        lm = self.landmarks
        height = float(np.linalg.norm(lm[CHIN] - lm[FOREHEAD]))
        return float(np.linalg.norm(lm[INNER_LOWER_LIP] - lm[INNER_UPPER_LIP])) / max(height, 1e-6)

    def lips(self) -> np.ndarray | None:
        """(len(LIP_POINTS), 2) lip landmarks, centred on their mean and divided by the face height."""
        if self.landmarks is None:
            return None
        lm = self.landmarks
        pts = lm[list(LIP_POINTS)]
        return (pts - pts.mean(axis=0)) / max(float(np.linalg.norm(lm[CHIN] - lm[FOREHEAD])), 1e-6)


class FaceDetector(Protocol):
    name: str

    def detect(self, frame: np.ndarray) -> list[Face]:
        """All faces in an (H, W, 3) uint8 RGB frame; frames of one video come in order."""

    def close(self) -> None: ...


class HaarFaces:
    """OpenCV's Haar cascade (boxes only). Deterministic, no landmarks."""

    name = "haar"

    def __init__(self, max_side: int = 640):
        from .portrait import _face_cascade  # one cascade per process

        self.cascade, self.max_side = _face_cascade(), max_side

    def detect(self, frame: np.ndarray) -> list[Face]:
        h, w = frame.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        faces, votes = self.cascade.detectMultiScale2(cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5,
                                                      minSize=(24, 24))
        if len(faces) == 0:
            return []
        top = max(votes)  # weakly supported boxes are texture, not faces (see portrait.detect_face)
        return [Face((x / scale, y / scale, (x + fw) / scale, (y + fh) / scale))
                for (x, y, fw, fh), n in zip(faces, votes) if n >= top / 4]

    def close(self) -> None:
        pass


def _landmarker(model_path: str | os.PathLike, video: bool, num_faces: int, min_confidence: float):
    """A MediaPipe FaceLandmarker (with blendshapes) from a .task file; FaceModelError, one line, if unusable."""
    path = Path(model_path)
    if not path.is_file():
        raise FaceModelError(f"{path}: MediaPipe face landmarker model not found (a face_landmarker*.task file)")
    try:
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision
    except ImportError as e:
        raise FaceModelError(f"face landmarks need the mediapipe package ({e}); or choose the haar detector") from e
    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=str(path)),
        running_mode=vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE,
        num_faces=num_faces, output_face_blendshapes=True, min_face_detection_confidence=min_confidence,
        min_face_presence_confidence=min_confidence, min_tracking_confidence=min_confidence)
    try:
        return mp, vision.FaceLandmarker.create_from_options(options)
    except (RuntimeError, ValueError) as e:
        raise FaceModelError(" ".join(f"{path}: not a usable face landmarker model ({e})".split())) from e


def _landmarked_faces(result, width: float, height: float, x0: float = 0.0, y0: float = 0.0) -> list[Face]:
    """A FaceLandmarker result on an image of width x height pixels placed at (x0, y0) of the frame ->
    Faces in frame pixels, boxed by their landmarks' extent."""
    faces = []
    for k, points in enumerate(result.face_landmarks):
        lm = np.array([(x0 + p.x * width, y0 + p.y * height) for p in points], np.float32)  # (478, 2)
        jaw = math.nan
        if result.face_blendshapes and k < len(result.face_blendshapes):
            jaw = next((c.score for c in result.face_blendshapes[k] if c.category_name == "jawOpen"), math.nan)
        faces.append(Face((float(lm[:, 0].min()), float(lm[:, 1].min()), float(lm[:, 0].max()), float(lm[:, 1].max())),
                          lm, float(jaw)))
    return faces


class MediaPipeFaces:
    """MediaPipe FaceLandmarker alone (video mode: frames of one video in order), finding faces with its
    own short-range detector. ``model_path``: a .task file (default: the one shipped)."""

    name = "mediapipe"

    def __init__(self, model_path: str | os.PathLike | None = None, max_faces: int = 3, min_confidence: float = 0.5,
                 fps: float = 25.0):
        self._mp, self._landmarker = _landmarker(model_path or LANDMARKER, True, max_faces, min_confidence)
        self._step_ms, self._t = max(1, round(1000 / fps)), 0

    def detect(self, frame: np.ndarray) -> list[Face]:
        h, w = frame.shape[:2]
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
        result = self._landmarker.detect_for_video(image, self._t)
        self._t += self._step_ms
        return _landmarked_faces(result, w, h)

    def close(self) -> None:
        self._landmarker.close()

    def __enter__(self) -> "MediaPipeFaces":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _covered(box: tuple[float, ...], faces: Sequence[Face], share: float = 0.6) -> bool:
    """Whether ``share`` of the box's area lies inside one of the faces' boxes."""
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-9)
    for f in faces:
        ix = max(0.0, min(box[2], f.box[2]) - max(box[0], f.box[0]))
        iy = max(0.0, min(box[3], f.box[3]) - max(box[1], f.box[1]))
        if ix * iy >= share * area:
            return True
    return False


class RetinaFaces:
    """RetinaFace finds the faces; the FaceLandmarker (image mode) runs on a square crop around each.

    The crop is ``crop_margin`` x the face box's larger side, centred on the box, resized to
    ``crop_size`` (what lies outside the frame is black): the face fills it the way the
    landmarker's selfie detector expects, whatever its size and place in the frame. Of what the
    landmarker finds in the crop, the face nearest its centre is kept (a neighbour's face may reach
    into the crop). A face is boxed by its landmarks' extent, as with ``"mediapipe"``; where the
    landmarker finds none in the crop, the face keeps its RetinaFace box and has no landmarks.

    Frames of one video come in order, and RetinaFace is most of the cost: it runs on every
    ``redetect_every``-th frame and on any frame where a followed face is lost. In between, each
    face of the previous frame is followed by cutting its crop around its previous landmarks (the
    landmarker's own detector, inside, still has to find a face there). A new face entering is so
    seen within ``redetect_every`` frames; 1: RetinaFace on every frame.

    Args:
        model_path: the FaceLandmarker .task file (default: the one shipped).
        weights: the RetinaFace state dict (default: the one shipped).
        max_faces: the best-scoring faces that get landmarks and are returned.
        min_score: RetinaFace's face probability threshold.
        redetect_every: RetinaFace's period in frames while every face is followed.
        landmarks: False: RetinaFace boxes only, on every frame (no mouth measures; no mediapipe needed).
    """

    name = "retinaface"

    def __init__(self, model_path: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                 max_faces: int = 3, min_score: float = 0.6, crop_margin: float = 2.0, crop_size: int = 256,
                 redetect_every: int = 5, landmarks: bool = True):
        from .retinaface import WEIGHTS, RetinaFaceDetector

        weights = Path(weights or WEIGHTS)
        if not weights.is_file():
            raise FaceModelError(f"{weights}: RetinaFace weights not found (a retinaface_mobilenet0.25 .pth file)")
        self.retina = RetinaFaceDetector(weights, min_score=min_score)
        self.max_faces, self.crop_margin, self.crop_size = max_faces, crop_margin, crop_size
        self.redetect_every = max(1, redetect_every)
        self._followed: list[Face] = []  # the previous frame's faces, all with landmarks
        self._since = 0  # frames since RetinaFace last ran
        self._mp = self._landmarker = None
        if landmarks:  # two faces: the crop may hold a neighbour's beside the one it was cut for
            self._mp, self._landmarker = _landmarker(model_path or LANDMARKER, False, 2, 0.5)

    def detect(self, frame: np.ndarray) -> list[Face]:
        self._since += 1
        if self._followed and self._since < self.redetect_every:
            followed = [self._landmarks(frame, f.box) for f in self._followed]
            if all(followed):
                faces: list[Face] = []
                for f in followed:
                    if not _covered(f.box, faces):  # two followed faces that became one
                        faces.append(f)
                self._followed = faces
                return faces
        self._since = 0
        faces = []
        for det in self.retina.detect(frame):  # best score first
            if len(faces) == self.max_faces:
                break
            if _covered(det.box, faces):  # a face-like part of a face already found (measured: scores 0.6-0.7)
                continue
            face = (self._landmarks(frame, det.box) if self._landmarker is not None else None) or Face(det.box)
            if not _covered(face.box, faces):  # its crop's landmarks may be of a face already found
                faces.append(face)
        self._followed = faces if self._landmarker is not None and all(f.landmarks is not None for f in faces) else []
        return faces

    def _landmarks(self, frame: np.ndarray, box: tuple[float, float, float, float]) -> Face | None:
        """The landmarked face nearest the centre of the square crop around ``box``, if any."""
        x0, y0, x1, y1 = box
        side = self.crop_margin * max(x1 - x0, y1 - y0)
        left, top = (x0 + x1 - side) / 2, (y0 + y1 - side) / 2
        k = self.crop_size / side  # frame pixels -> crop pixels
        warp = np.array([[k, 0.0, -left * k], [0.0, k, -top * k]], np.float32)
        crop = cv2.warpAffine(frame, warp, (self.crop_size, self.crop_size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=crop)
        found = _landmarked_faces(self._landmarker.detect(image), side, side, left, top)
        if not found:
            return None
        centre = np.array([left + side / 2, top + side / 2])
        return min(found, key=lambda f: float(np.hypot(*(np.array(f.centre) - centre))))

    def close(self) -> None:
        if self._landmarker is not None:
            self._landmarker.close()

    def __enter__(self) -> "RetinaFaces":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class FaceSettings:
    """How preprocessing finds and crops faces (the preprocess config's face section)."""

    detector: str = "retinaface"  # "retinaface" | "mediapipe" | "haar"
    model: str | None = None  # the FaceLandmarker .task file (retinaface, mediapipe); None: the one shipped
    margin: float = 1.8  # crop side = margin x the median face size of the shot
    crop: str = "track"  # "track": the centre follows the smoothed face; "fixed": one box per shot
    smooth_seconds: float = 0.5  # the crop centre is a moving average over this window
    analysis_side: int = 720  # frames are scaled to at most this side for detection
    cut_threshold: float = 0.5  # Bhattacharyya distance of consecutive colour histograms that marks a cut
    max_faces: int = 3

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"face crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"face detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        if not self.margin > 0 or self.smooth_seconds < 0 or self.analysis_side < 64 or not 0 < self.cut_threshold <= 1:
            raise ValueError("face settings: margin > 0, smooth_seconds >= 0, analysis_side >= 64, "
                             "0 < cut_threshold <= 1")

    def detector_for(self, fps: float) -> FaceDetector:
        return make_detector(self.detector, self.model, fps=fps, max_faces=self.max_faces)


def make_detector(name: str, model: str | os.PathLike | None = None, fps: float = 25.0,
                  max_faces: int = 3) -> FaceDetector:
    """A detector by name; ``model``: the FaceLandmarker .task file (None: the one shipped)."""
    if name == "retinaface":
        return RetinaFaces(model, max_faces=max_faces)
    if name == "mediapipe":
        return MediaPipeFaces(model, max_faces=max_faces, fps=fps)
    if name == "haar":
        return HaarFaces()
    raise FaceModelError(f"unknown face detector {name!r} (one of {', '.join(DETECTORS)})")


# ----------------------------------------------------------------------------------- shots


def frame_signature(frame: np.ndarray) -> np.ndarray:
    """A normalised 8x8x8 RGB histogram of a 64-pixel thumbnail: what cut detection compares."""
    thumb = cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA)
    hist = cv2.calcHist([thumb], [0, 1, 2], None, [8, 8, 8], [0, 256, 0, 256, 0, 256]).ravel()
    return (hist / max(hist.sum(), 1.0)).astype(np.float32)


def find_cuts(signatures: Sequence[np.ndarray], threshold: float = 0.5) -> list[int]:
    """Frame indices that start a new shot: the Bhattacharyya distance to the previous frame's
    histogram is over ``threshold`` (within one shot it stays below ~0.2 on the real clips)."""
    cuts = []
    for i in range(1, len(signatures)):
        d = cv2.compareHist(signatures[i - 1], signatures[i], cv2.HISTCMP_BHATTACHARYYA)
        if d > threshold:
            cuts.append(i)
    return cuts


# ----------------------------------------------------------------------------------- tracking


@dataclass
class FaceTrack:
    """The main face of a video, frame by frame, and the crop boxes cut around it."""

    size: tuple[int, int]  # source (width, height)
    faces: list[Face | None]  # the main face per frame (None: not found)
    shots: list[tuple[int, int]]  # [start, end) frame ranges
    boxes: np.ndarray  # (N, 4) int crop boxes in source pixels, square
    detector: str
    other_faces: int = 0  # frames in which more than one face was found
    notes: list[str] = field(default_factory=list)

    @property
    def face_fraction(self) -> float:
        return sum(f is not None for f in self.faces) / max(len(self.faces), 1)

    @property
    def aperture(self) -> np.ndarray:
        return np.array([f.aperture if f is not None else math.nan for f in self.faces], np.float64)

    @property
    def jaw_open(self) -> np.ndarray:
        return np.array([f.jaw_open if f is not None else math.nan for f in self.faces], np.float64)

    def crop_jitter(self) -> float:
        """RMS frame-to-frame move of the crop centre within shots, in % of the crop side."""
        steps = []
        for s, e in self.shots:
            b = self.boxes[s:e].astype(np.float64)
            if len(b) < 2:
                continue
            centre = (b[:, :2] + b[:, 2:]) / 2
            steps.append(np.linalg.norm(np.diff(centre, axis=0), axis=1) / (b[1:, 2] - b[1:, 0]))
        return float(np.sqrt(np.mean(np.concatenate(steps) ** 2)) * 100) if steps else 0.0

    def truncated(self, n: int) -> "FaceTrack":
        """The first n frames (shots clipped to them)."""
        shots = [(s, min(e, n)) for s, e in self.shots if s < n]
        return FaceTrack(self.size, self.faces[:n], shots, self.boxes[:n], self.detector, self.other_faces,
                         list(self.notes))

    def face_pixels(self) -> float:
        """Median side of the detected face in source pixels (its resolution before resizing)."""
        sizes = [f.size for f in self.faces if f is not None]
        return float(np.median(sizes)) if sizes else 0.0


def _score(face: Face, width: int, height: int) -> float:
    """Largest and most central: area, discounted by up to half for distance from the centre."""
    cx, cy = face.centre
    d = math.hypot((cx - width / 2) / (width / 2), (cy - height / 2) / (height / 2)) / math.sqrt(2)
    return face.size ** 2 * (1.0 - 0.5 * min(d, 1.0))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _main_faces(detections: Sequence[list[Face]], shots: Sequence[tuple[int, int]], width: int,
                height: int) -> list[Face | None]:
    """Per shot: the best-scoring face starts the track, which then follows the face overlapping
    it most (IoU > 0.3); when the track is lost the best-scoring face takes over again."""
    main: list[Face | None] = [None] * len(detections)
    for s, e in shots:
        prev: Face | None = None
        for i in range(s, e):
            faces = detections[i]
            if not faces:
                continue
            pick = None
            if prev is not None:
                overlap = max(faces, key=lambda f: _iou(f.box, prev.box))
                if _iou(overlap.box, prev.box) > 0.3:
                    pick = overlap
            if pick is None:
                pick = max(faces, key=lambda f: _score(f, width, height))
            main[i] = prev = pick
    return main


def fill_gaps(values: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN entries (held flat at the ends); unchanged when all or none are NaN."""
    ok = np.isfinite(values)
    if ok.all() or not ok.any():
        return values
    idx = np.arange(len(values))
    return np.interp(idx, idx[ok], values[ok])


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(x) < 2:
        return x
    half = window // 2
    padded = np.pad(x, (half, half), mode="edge")
    return np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), mode="valid")


def crop_boxes(faces: Sequence[Face | None], shots: Sequence[tuple[int, int]], width: int, height: int,
               margin: float = 1.8, smooth_frames: int = 13, fixed: bool = False) -> np.ndarray:
    """(N, 4) square crop boxes: per shot a fixed side (margin x median face size, at most the
    frame's shorter side) centred on the smoothed face centre (a little above it, for hair and
    chin), shifted to lie inside the frame; ``fixed``: the median centre, one box for the shot.
    A shot without any face gets the centre square."""
    boxes = np.zeros((len(faces), 4), np.int64)
    short = min(width, height)
    for s, e in shots:
        found = [f for f in faces[s:e] if f is not None]
        if not found:
            side = short
            cx = np.full(e - s, width / 2)
            cy = np.full(e - s, height / 2)
        else:
            size = float(np.median([f.size for f in found]))
            side = max(1, min(short, round(margin * size)))
            cx = fill_gaps(np.array([f.centre[0] if f else np.nan for f in faces[s:e]], np.float64))
            cy = fill_gaps(np.array([f.centre[1] - 0.1 * f.size if f else np.nan for f in faces[s:e]], np.float64))
            if fixed:
                cx, cy = np.full(e - s, np.median(cx)), np.full(e - s, np.median(cy))
            else:
                cx, cy = _moving_average(cx, smooth_frames), _moving_average(cy, smooth_frames)
        x0 = np.clip(np.rint(cx - side / 2), 0, width - side).astype(np.int64)
        y0 = np.clip(np.rint(cy - side / 2), 0, height - side).astype(np.int64)
        boxes[s:e] = np.stack([x0, y0, x0 + side, y0 + side], axis=1)
    return boxes


def track_faces(frames: Iterable[np.ndarray], detector: FaceDetector, settings: FaceSettings,
                fps: float) -> FaceTrack:
    """Detect in every frame, split into shots, follow the main face, cut smoothed crop boxes.

    ``frames`` are (H, W, 3) uint8 RGB at ``fps`` (one video, in order). Boxes come back in the
    frames' own pixel coordinates (`scale_track` maps them to another resolution).
    """
    detections: list[list[Face]] = []
    signatures: list[np.ndarray] = []
    width = height = 0
    for frame in frames:
        height, width = frame.shape[:2]
        detections.append(detector.detect(frame))
        signatures.append(frame_signature(frame))
    n = len(detections)
    cuts = find_cuts(signatures, settings.cut_threshold)
    bounds = [0, *cuts, n]
    shots = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    faces = _main_faces(detections, shots, width, height)
    smooth = max(1, round(settings.smooth_seconds * fps))
    boxes = crop_boxes(faces, shots, width, height, settings.margin, smooth, fixed=settings.crop == "fixed")
    return FaceTrack((width, height), faces, shots, boxes, detector.name,
                     other_faces=sum(len(d) > 1 for d in detections))


def scale_track(track: FaceTrack, width: int, height: int) -> FaceTrack:
    """The same track in a frame of another resolution (e.g. detection ran on a scaled copy)."""
    sx, sy = width / track.size[0], height / track.size[1]
    if sx == 1 and sy == 1:
        return track

    def scaled(f: Face | None) -> Face | None:
        if f is None:
            return None
        x0, y0, x1, y1 = f.box
        lm = None if f.landmarks is None else f.landmarks * np.array([sx, sy], np.float32)
        return Face((x0 * sx, y0 * sy, x1 * sx, y1 * sy), lm, f.jaw_open)

    faces = [scaled(f) for f in track.faces]
    b = track.boxes.astype(np.float64)
    side = np.minimum(np.rint((b[:, 2] - b[:, 0]) * (sx + sy) / 2), min(width, height)).astype(np.int64)
    x0 = np.clip(np.rint(b[:, 0] * sx), 0, width - side).astype(np.int64)
    y0 = np.clip(np.rint(b[:, 1] * sy), 0, height - side).astype(np.int64)
    boxes = np.stack([x0, y0, x0 + side, y0 + side], axis=1)
    return FaceTrack((width, height), faces, list(track.shots), boxes, track.detector, track.other_faces,
                     list(track.notes))


def crop_frame(frame: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """Cut ``box`` out of an (H, W, 3) frame and resize it to size x size (area filter when shrinking)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    part = frame[y0:y1, x0:x1]
    if part.shape[0] == size and part.shape[1] == size:
        return np.ascontiguousarray(part)
    interp = cv2.INTER_AREA if part.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(part, (size, size), interpolation=interp)

