"""Procedural faces: the look of a speaker (`Identity`), where its parts sit (`Layout`), drawing
one frame (`render_face`, `draw_portrait`) and the pixel measure of mouth opening (`mouth_box`,
`measure_mouth_open`).

The shading (eye sockets, brows, a lit nose bridge, a dark mouth) is chosen so that OpenCV's Haar
frontal-face cascade (`letstalk.portrait.detect_face`) finds the face. Deterministic; needs only
numpy and OpenCV.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "Identity", "Layout", "layout", "render_face", "mouth_box", "measure_mouth_open", "draw_portrait",
    "HAIR_STYLES",
]

HAIR_STYLES = ("short", "long", "buzz", "tall", "bob")

Color = tuple[int, int, int]

# Skin tones from light to dark brown (RGB); every one keeps a luma well above the open mouth's.
_SKIN_TONES: tuple[Color, ...] = (
    (248, 215, 190), (240, 200, 170), (228, 185, 150), (222, 175, 135), (205, 160, 120),
    (190, 140, 105), (170, 120, 85), (150, 105, 75), (135, 95, 68),
)
_HAIR_COLORS: tuple[Color, ...] = (
    (25, 20, 20), (45, 32, 25), (80, 55, 35), (120, 80, 45), (170, 130, 70), (215, 185, 120),
    (150, 60, 30), (130, 130, 135), (200, 200, 205), (60, 40, 90),
)
_IRIS_COLORS: tuple[Color, ...] = ((70, 45, 25), (40, 30, 20), (60, 90, 130), (70, 100, 60), (100, 80, 50))


def _luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _jitter(rng: np.random.Generator, color, amount: float) -> Color:
    return tuple(int(v) for v in np.clip(np.asarray(color) + rng.normal(0, amount, 3), 0, 255).round())


def _mix(a, b, t: float) -> np.ndarray:
    return np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t


# ------------------------------------------------------------------------------------ identity


@dataclass(frozen=True)
class Identity:
    """The appearance (and voice pitch) of one procedural speaker.

    Lengths are fractions of the frame side (``face_width``/``face_height`` are the half-axes
    of the face oval) or ratios to the face half-width (``eye_spacing``, ``eye_size``,
    ``mouth_width``), so an identity renders the same at any size.
    """

    skin: Color
    hair: Color
    background: Color
    shirt: Color
    iris: Color
    lips: Color
    face_width: float  # half-width of the face oval / frame side
    face_height: float  # half-height of the face oval / frame side
    jaw: float  # 0 = round chin .. 0.3 = narrow chin
    eye_spacing: float  # eye centre's distance from the midline / face half-width
    eye_size: float  # eye half-width / face half-width
    mouth_width: float  # mouth half-width / face half-width
    nose_length: float  # nose base below the eye line / face half-height
    brow_thickness: float  # / face half-height
    brow_tilt: float  # > 0: outer ends higher
    hairline: float  # hairline height above the face centre / face half-height
    hair_style: str  # one of HAIR_STYLES
    light: float  # -1 (lit from the left) .. 1 (from the right)
    voice_pitch: float  # Hz, mean pitch of the speech

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Identity:
        """A random identity. Colours come from palettes with jitter; the background is redrawn
        until it contrasts with both skin and hair, so the head stands out."""
        tone = np.asarray(_SKIN_TONES[rng.integers(len(_SKIN_TONES))], np.float64)
        skin = _jitter(rng, tone * rng.uniform(0.93, 1.05), 3)
        hair = _jitter(rng, _HAIR_COLORS[rng.integers(len(_HAIR_COLORS))], 8)
        for _ in range(100):
            hsv = np.array([[[rng.uniform(0, 180), rng.uniform(40, 200), rng.uniform(60, 235)]]], np.float32)
            bg = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0]
            contrast = _luma(bg) - _luma(skin)
            # a face darker than both its hair and the background is hard to detect: keep such
            # a face (light hair on darker skin) on a darker background
            if abs(contrast) > 45 and np.abs(bg.astype(int) - skin).sum() > 120 \
                    and np.abs(bg.astype(int) - hair).sum() > 90 \
                    and (_luma(hair) < _luma(skin) + 20 or contrast < 0):
                break
        background = tuple(int(v) for v in bg)
        shirt = tuple(int(v) for v in rng.integers(20, 236, 3))
        red = np.array([185, 60, 80]) if _luma(skin) > 150 else np.array([125, 40, 50])
        lips = tuple(int(v) for v in _mix(skin, red, rng.uniform(0.5, 0.7)).round())
        return cls(
            skin=skin, hair=hair, background=background, shirt=shirt,
            iris=_jitter(rng, _IRIS_COLORS[rng.integers(len(_IRIS_COLORS))], 6), lips=lips,
            face_width=round(float(rng.uniform(0.19, 0.235)), 4),
            face_height=round(float(rng.uniform(0.27, 0.31)), 4),
            jaw=round(float(rng.uniform(0.0, 0.28)), 4),
            eye_spacing=round(float(rng.uniform(0.40, 0.50)), 4),
            eye_size=round(float(rng.uniform(0.19, 0.25)), 4),
            mouth_width=round(float(rng.uniform(0.30, 0.42)), 4),
            nose_length=round(float(rng.uniform(0.30, 0.40)), 4),
            brow_thickness=round(float(rng.uniform(0.04, 0.075)), 4),
            brow_tilt=round(float(rng.uniform(-0.25, 0.3)), 4),
            hairline=round(float(rng.uniform(0.55, 0.8)), 4),
            hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
            light=round(float(rng.uniform(-1, 1)), 4),
            voice_pitch=round(float(rng.uniform(95, 230)), 2),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Identity:
        """Inverse of `to_dict` (e.g. from a sidecar's "identity_params"); unknown keys are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in fields}
        return cls(**kw)


@dataclass(frozen=True)
class Layout:
    """Where the parts of an identity's face are, in unit frame coordinates (x right, y down)."""

    cx: float
    cy: float
    a: float
    b: float
    eye_y: float
    eye_dx: float
    eye_rx: float
    eye_ry: float
    brow_y: float
    nose_y: float
    mouth_y: float
    mouth_w: float
    mouth_h: float  # half-height of the fully open mouth
    lip: float  # lip thickness


def layout(ident: Identity) -> Layout:
    """The `Layout` of `ident`'s face (its rest pose: no sway, mouth closed)."""
    a, b = ident.face_width, ident.face_height
    cx, cy = 0.5, 0.53
    eye_rx = ident.eye_size * a
    eye_y = cy - 0.16 * b
    mouth_w = ident.mouth_width * a
    return Layout(cx=cx, cy=cy, a=a, b=b, eye_y=eye_y, eye_dx=ident.eye_spacing * a,
                  eye_rx=eye_rx, eye_ry=0.48 * eye_rx, brow_y=eye_y - 0.23 * b,
                  nose_y=eye_y + ident.nose_length * b, mouth_y=cy + 0.46 * b,
                  mouth_w=mouth_w, mouth_h=0.55 * mouth_w, lip=0.22 * mouth_w + 0.01 * b)


# ------------------------------------------------------------------------------------- drawing


class _Canvas:
    """A float32 RGB image in [0, 255] plus pixel-centre coordinates in unit frame space."""

    def __init__(self, size: int, color, box: tuple[int, int, int, int] | None = None):
        self.size = size
        self.px = 1.0 / size
        x0, y0, x1, y1 = box or (0, 0, size, size)
        self.box = (x0, y0, x1, y1)
        self.X = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / size)[None, :]
        self.Y = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / size)[:, None]
        self.img = np.empty((y1 - y0, x1 - x0, 3), np.float32)
        self.img[:] = np.asarray(color, np.float32)

    def paint(self, alpha: np.ndarray, color) -> None:
        """Composite a flat colour with per-pixel coverage `alpha`."""
        a = alpha[..., None]
        self.img += a * (np.asarray(color, np.float32) - self.img)

    def shade(self, factor: np.ndarray) -> None:
        """Multiply brightness by `factor` (per pixel)."""
        self.img *= factor[..., None]

    # ---- shapes: coverage in [0, 1], antialiased over one pixel

    def _cover(self, dist: np.ndarray, soft: float = 1.0) -> np.ndarray:
        return np.clip(0.5 - dist / (self.px * soft), 0.0, 1.0)

    def ellipse(self, cx, cy, rx, ry, angle: float = 0.0, soft: float = 1.0) -> np.ndarray:
        x, y = self.X - cx, self.Y - cy
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            x, y = c * x + s * y, -s * x + c * y
        u, v = x / rx, y / ry
        r = np.sqrt(u * u + v * v)
        grad = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) / np.maximum(r, 1e-6)  # |grad r|
        return self._cover((r - 1.0) / np.maximum(grad, 1e-6), soft)

    def polyline(self, points, radii, soft: float = 1.0) -> np.ndarray:
        """A stroke along `points` whose half-width goes linearly through `radii` (a capsule chain)."""
        best = None
        for (p, q), (r0, r1) in zip(zip(points[:-1], points[1:]), zip(radii[:-1], radii[1:])):
            dx, dy = q[0] - p[0], q[1] - p[1]
            t = np.clip(((self.X - p[0]) * dx + (self.Y - p[1]) * dy) / (dx * dx + dy * dy), 0, 1)
            d = np.hypot(self.X - (p[0] + t * dx), self.Y - (p[1] + t * dy)) - (r0 + t * (r1 - r0))
            best = d if best is None else np.minimum(best, d)
        return self._cover(best, soft)

    def blob(self, cx, cy, sx, sy) -> np.ndarray:
        """A Gaussian bump (peak 1) for soft shading."""
        return np.exp(-0.5 * (((self.X - cx) / sx) ** 2 + ((self.Y - cy) / sy) ** 2))


def _face_shape(cv: _Canvas, L: Layout, ident: Identity, grow: float = 0.0) -> np.ndarray:
    """Coverage of the face oval, narrowed towards the chin by `jaw`."""
    t = np.clip((cv.Y - L.cy) / L.b, 0, 1)
    narrow = 1 - ident.jaw * t * t
    x = (cv.X - L.cx) / narrow
    u, v = x / (L.a + grow), (cv.Y - L.cy) / (L.b + grow)
    r = np.sqrt(u * u + v * v)
    return cv._cover((r - 1.0) * min(L.a, L.b))


def _hair_back(cv: _Canvas, L: Layout, style: str) -> np.ndarray:
    """Hair behind the head (drawn before the face)."""
    a, b = L.a, L.b
    if style == "buzz":
        return cv.ellipse(L.cx, L.cy - 0.02 * b, a * 1.03, b * 1.02)
    if style == "tall":
        return cv.ellipse(L.cx, L.cy - 0.22 * b, a * 1.12, b * 1.08)
    cap = cv.ellipse(L.cx, L.cy - 0.1 * b, a * 1.13, b * 1.03)
    if style == "long":
        sides = cv.polyline([(L.cx, L.cy - 0.4 * b), (L.cx, L.cy + 1.1 * b)], [a * 1.2, a * 1.3])
        return np.maximum(cap, sides)
    if style == "bob":
        sides = cv.polyline([(L.cx, L.cy - 0.3 * b), (L.cx, L.cy + 0.45 * b)], [a * 1.18, a * 1.18])
        return np.maximum(cap, sides)
    return cap


@functools.lru_cache(maxsize=16)
def _static_layer(ident: Identity, size: int) -> np.ndarray:
    """Everything that does not move with speech or blinks: background, hair, shaded face,
    brows, nose. Returned read-only; callers copy."""
    L = layout(ident)
    a, b = L.a, L.b
    cv = _Canvas(size, ident.background)
    # background: a soft vertical gradient and vignette
    cv.shade(1.08 - 0.16 * cv.Y - 0.25 * ((cv.X - 0.5) ** 2 + (cv.Y - 0.45) ** 2))

    # hair behind the head, shoulders, neck
    cv.paint(_hair_back(cv, L, ident.hair_style), _mix(ident.hair, (0, 0, 0), 0.2))
    cv.paint(cv.ellipse(L.cx, L.cy + b + 0.32, a * 2.6, 0.3), ident.shirt)
    neck = cv.polyline([(L.cx, L.cy + 0.5 * b), (L.cx, L.cy + b + 0.16)], [a * 0.55, a * 0.6])
    cv.paint(neck, _mix(ident.skin, (0, 0, 0), 0.3))
    cv.shade(1 - 0.25 * neck * cv.blob(L.cx, L.cy + b + 0.01, a, 0.04))  # under the jaw

    # the face, with its own shading
    face = _face_shape(cv, L, ident)
    cv.paint(face, ident.skin)
    u, v = (cv.X - L.cx) / a, (cv.Y - L.cy) / b
    rr = u * u + v * v
    light = 1.0 + 0.04 * ident.light * u  # side light
    rim = 1.0 - 0.32 * np.clip(rr, 0, 1.2) ** 2.5  # darker towards the outline
    shading = light * rim
    # eye sockets: dark hollows around and just above the eyes
    for side in (-1, 1):
        ex = L.cx + side * L.eye_dx
        shading -= 0.3 * cv.blob(ex, L.eye_y - 0.02 * b, L.eye_rx * 1.25, L.eye_rx * 0.75)
        shading += 0.1 * cv.blob(ex + side * 0.05 * a, L.eye_y + 0.3 * b, 0.22 * a, 0.1 * b)  # cheekbone
    # forehead highlight and a lit nose bridge between the dark sockets
    shading += 0.08 * cv.blob(L.cx, L.cy - 0.55 * b, 0.45 * a, 0.2 * b)
    shading += 0.16 * cv.blob(L.cx, (L.eye_y + L.nose_y) / 2 - 0.05 * b, 0.07 * a,
                              (L.nose_y - L.eye_y) * 0.55)
    # nose side shadow (away from the light) and the shadow under the nose
    nose_side = -1.0 if ident.light >= 0 else 1.0
    shading -= 0.12 * cv.blob(L.cx + nose_side * 0.12 * a, (L.eye_y + L.nose_y) / 2 + 0.05 * b,
                              0.05 * a, (L.nose_y - L.eye_y) * 0.4)
    shading -= 0.15 * cv.blob(L.cx, L.nose_y + 0.05 * b, 0.16 * a, 0.04 * b)
    # chin shading below the mouth
    shading -= 0.08 * cv.blob(L.cx, L.mouth_y + 0.22 * b, 0.3 * a, 0.07 * b)
    cv.img = cv.img * (1 - face[..., None]) + cv.img * face[..., None] * shading[..., None]

    # nostrils and the nose tip
    for side in (-1, 1):
        cv.paint(0.8 * cv.ellipse(L.cx + side * 0.09 * a, L.nose_y, 0.055 * a, 0.028 * b, soft=1.5),
                 _mix(ident.skin, (20, 10, 10), 0.7))
    cv.paint(0.35 * cv.ellipse(L.cx, L.nose_y - 0.06 * b, 0.1 * a, 0.05 * b, soft=3),
             _mix(ident.skin, (255, 255, 255), 0.3))

    # hair in front: fringe above the hairline, falling at the temples
    if ident.hair_style != "buzz":
        hairline = L.cy - ident.hairline * b + 0.55 * b * ((cv.X - L.cx) / a) ** 2 \
                   + 0.08 * b * ident.light * (cv.X - L.cx) / a
        fringe = _face_shape(cv, L, ident, grow=0.004) * np.clip((hairline - cv.Y) / cv.px + 0.5, 0, 1)
        cv.paint(fringe, ident.hair)
    else:
        hairline = L.cy - ident.hairline * b + 0.4 * b * ((cv.X - L.cx) / a) ** 2
        fringe = _face_shape(cv, L, ident, grow=0.004) * np.clip((hairline - cv.Y) / (3 * cv.px), 0, 1)
        cv.paint(0.6 * fringe, ident.hair)

    # eyebrows: thick arcs, thicker at the inner end, always clearly darker than the skin
    # (light hair gets darker brows: Haar cascades look for a dark brow-and-eye band)
    dark = float(np.clip(1 - 0.45 * _luma(ident.skin) / max(_luma(ident.hair), 1), 0.2, 0.85))
    brow = _mix(ident.hair, (15, 10, 5), dark)
    bt = ident.brow_thickness * b
    for side in (-1, 1):
        ex = L.cx + side * L.eye_dx
        pts = []
        for t in np.linspace(-1, 1, 7):
            x = ex + side * t * L.eye_rx * 1.25
            y = L.brow_y - 0.05 * b * (1 - t * t) - ident.brow_tilt * 0.06 * b * t
            pts.append((x, y))
        radii = list(np.linspace(bt * 0.6, bt * 0.35, 7))
        cv.paint(0.95 * cv.polyline(pts, radii, soft=1.5), brow)
    out = np.clip(cv.img, 0, 255)
    out.flags.writeable = False  # shared by the cache
    return out


def _draw_eyes(img: np.ndarray, ident: Identity, L: Layout, size: int, eye_open: float) -> None:
    eye_open = float(np.clip(eye_open, 0.0, 1.0))
    for side in (-1, 1):
        ex, ey = L.cx + side * L.eye_dx, L.eye_y
        rx, ry = L.eye_rx, L.eye_ry
        box = _box(ex, ey, rx * 1.5, ry * 2.2, size)
        cv = _Canvas(size, 0, box)
        cv.img = img[box[1]:box[3], box[0]:box[2]]
        h = max(ry * eye_open, 0.25 * cv.px)
        cy = ey + (ry - h) * 0.6  # the upper lid comes down
        # lash line / lid crease: a dark rim, heaviest on top
        lash = cv.ellipse(ex, cy - 0.15 * ry, rx * 1.08, h + 0.3 * ry, soft=1.2)
        cv.paint(0.85 * lash, _mix(ident.hair, (10, 5, 5), 0.7))
        if eye_open > 0.05:
            white = cv.ellipse(ex, cy, rx, h)
            cv.paint(white, _mix(ident.skin, (235, 232, 228), 0.5))
            iris = cv.ellipse(ex, ey, 0.56 * rx, 0.56 * rx) * white
            cv.paint(iris, _mix(ident.iris, (0, 0, 0), 0.2))
            cv.paint(cv.ellipse(ex, ey, 0.26 * rx, 0.26 * rx) * white, (12, 10, 10))
            cv.paint(0.8 * cv.ellipse(ex + 0.15 * rx, ey - 0.15 * rx, 0.08 * rx, 0.08 * rx) * white,
                     (250, 250, 250))
            # shadow of the upper lid on the eyeball
            cv.shade(1 - 0.35 * white * np.clip((cy - h * 0.3 - cv.Y) / (h + 1e-6) + 0.5, 0, 1))


def _draw_mouth(img: np.ndarray, ident: Identity, L: Layout, size: int, mouth_open: float) -> None:
    m = float(np.clip(mouth_open, 0.0, 1.0))
    w, hmax, lip = L.mouth_w, L.mouth_h, L.lip
    top, bottom = L.mouth_y - lip, L.mouth_y + 1.35 * hmax + 3.4 * lip  # includes the chin shadow
    box = _box(L.cx, (top + bottom) / 2, w * 2.0, (bottom - top) / 2, size)
    cv = _Canvas(size, 0, box)
    cv.img = img[box[1]:box[3], box[0]:box[2]]
    h = m * hmax
    my = L.mouth_y + 0.35 * h  # the jaw drops: the opening grows downwards
    # lips: the upper lip a little darker than the lower one, which catches the light
    outer = cv.ellipse(L.cx, my, w * 1.02, h + lip)
    cv.paint(outer, ident.lips)
    cv.shade(1 - 0.12 * outer * np.clip((my - cv.Y) / cv.px + 0.5, 0, 1))
    cv.shade(1 + 0.08 * outer * cv.blob(L.cx, my + h + 0.5 * lip, 0.5 * w, 0.3 * lip))
    # the lower lip's shadow on the chin
    cv.shade(1 - 0.12 * cv.blob(L.cx, my + h + lip * 1.4, w * 0.6, lip * 0.6))
    if h > 0.05 * cv.px:  # the dark opening
        cv.paint(cv.ellipse(L.cx, my, w * 0.9, h), (38, 14, 16))
    seam = cv.ellipse(L.cx, my, w * 0.95, max(0.35 * cv.px, 0.2 * h), soft=1.3)
    cv.paint(0.9 * seam, (45, 18, 20))


def _box(cx, cy, rx, ry, size: int) -> tuple[int, int, int, int]:
    return (max(0, int(math.floor((cx - rx) * size)) - 1), max(0, int(math.floor((cy - ry) * size)) - 1),
            min(size, int(math.ceil((cx + rx) * size)) + 2), min(size, int(math.ceil((cy + ry) * size)) + 2))


def render_face(identity: Identity, size: int = 256, mouth_open: float = 0.0, eye_open: float = 1.0,
                offset: tuple[float, float] = (0.0, 0.0), angle: float = 0.0, blur: float = 1.2) -> np.ndarray:
    """One (size, size, 3) uint8 RGB frame of `identity`.

    mouth_open: 0 (closed, a lip line) .. 1 (wide open); the dark opening's height is
    proportional to it. eye_open: 1 (open) .. 0 (closed, a blink). offset: head translation in
    pixels (dx, dy); angle: head roll in degrees (about the face centre). blur: sigma of a final
    Gaussian blur in pixels of a 256-pixel frame (scaled with `size`): it softens edges as a
    camera would, and makes the face easier for Haar cascades to find. Deterministic.
    """
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    L = layout(identity)
    img = _static_layer(identity, size).copy()
    _draw_eyes(img, identity, L, size, eye_open)
    _draw_mouth(img, identity, L, size, mouth_open)
    dx, dy = float(offset[0]), float(offset[1])
    if dx or dy or angle:
        m = cv2.getRotationMatrix2D((L.cx * size - 0.5, L.cy * size - 0.5), float(angle), 1.0)
        m[:, 2] += (dx, dy)
        img = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), blur * size / 256)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def mouth_box(identity: Identity, size: int, margin: float | None = None) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box (x1, y1 exclusive) that holds the mouth at any opening, with
    `margin` pixels of room for head sway (default 2.5% of `size` + 1, which covers
    `make_talking_video`'s sway)."""
    L = layout(identity)
    if margin is None:
        margin = 0.025 * size + 1
    x0 = int(math.floor((L.cx - 1.02 * L.mouth_w) * size - margin))
    x1 = int(math.ceil((L.cx + 1.02 * L.mouth_w) * size + margin))
    y0 = int(math.floor((L.mouth_y - L.lip) * size - margin))
    y1 = int(math.ceil((L.mouth_y + 1.35 * L.mouth_h + L.lip) * size + margin))
    return max(0, x0), max(0, y0), min(size, x1), min(size, y1)


def measure_mouth_open(frames: np.ndarray, identity: Identity, threshold: float = 55.0) -> np.ndarray:
    """(N,) pixel measure of mouth opening: the fraction of dark pixels (luma < threshold) in
    `mouth_box`. Works on rendered or decoded frames of shape (N, S, S, 3) uint8; grows about
    linearly with the ground-truth mouth opening."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    x0, y0, x1, y1 = mouth_box(identity, frames.shape[1])
    roi = frames[:, y0:y1, x0:x1].astype(np.float32)
    luma = roi @ np.array([0.299, 0.587, 0.114], np.float32)
    return (luma < threshold).mean(axis=(1, 2))


# ---------------------------------------------------------------------------------- portraits


def draw_portrait(size: int = 256, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8: a still frontal face of the identity drawn from `seed`, mouth closed."""
    return render_face(Identity.sample(np.random.default_rng(seed)), size)
