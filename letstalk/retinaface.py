"""RetinaFace with a MobileNet-0.25 backbone: a small face detector that finds faces from ~10-20 px up.

The network of Deng et al., "RetinaFace: Single-stage Dense Face Localisation in the Wild" (2019), in
the small form trained by biubug6 (Face-Detector-1MB-with-landmark, MIT): a MobileNetV1 at a quarter
of its width, a three-level feature pyramid (strides 8, 16, 32), an SSH context module per level and
1x1 heads that give, per anchor, a face score, a box and five points (eyes, nose tip, mouth corners).
Written here from the paper, the layout of the published state dict (whose keys it loads with
``strict=True``) and the authors' training settings (anchors, activations); the weights ship with the
package (``letstalk/weights``, see SOURCE.md there).

Input: an (H, W, 3) uint8 RGB image of any size (the network is fully convolutional). It is fed as
BGR minus the channel means (104, 117, 123), the way the weights were trained, at its own size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "retinaface_mobilenet0.25.pth"
BGR_MEAN = (104.0, 117.0, 123.0)
STEPS = (8, 16, 32)  # the pyramid levels' strides
# anchor sides (pixels) per level, two square anchors per cell: those these weights were trained with (the
# authors' data/config.py cfg_mnet; Pytorch_Retinaface's larger model uses 16-512)
MIN_SIZES = ((10, 20), (32, 64), (128, 256))
VARIANCE = (0.1, 0.2)  # the box encoding's scales for centre offsets and log-sizes


# Every activation is a plain ReLU, as in the authors' models/net.py that these weights were trained with
# (Pytorch_Retinaface's larger model has LeakyReLU(0.1) in places).


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3, groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU). Indices 0, 1 (, 2) are the state dict's."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def _depthwise_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNetV1's block: 3x3 depthwise (stride) then 1x1 pointwise, each with BN + ReLU."""
    dw, pw = _conv_bn(cin, cin, stride, groups=cin), _conv_bn(cin, cout, kernel=1)
    return nn.Sequential(*dw, *pw)  # flat: indices 0-5, as in the state dict


class MobileNetQuarter(nn.Module):
    """MobileNetV1 at width 0.25, its three stages' outputs at strides 8, 16, 32 (64, 128, 256 channels)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(  # /8, 64 channels
            _conv_bn(3, 8, stride=2), _depthwise_separable(8, 16, 1), _depthwise_separable(16, 32, 2),
            _depthwise_separable(32, 32, 1), _depthwise_separable(32, 64, 2), _depthwise_separable(64, 64, 1))
        self.stage2 = nn.Sequential(  # /16, 128 channels
            _depthwise_separable(64, 128, 2), *[_depthwise_separable(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_depthwise_separable(128, 256, 2), _depthwise_separable(256, 256, 1))  # /32

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)  # (B, 64, H/8, W/8)
        c2 = self.stage2(c1)  # (B, 128, H/16, W/16)
        c3 = self.stage3(c2)  # (B, 256, H/32, W/32)
        return [c1, c2, c3]


class FeaturePyramid(nn.Module):
    """Top-down pyramid: 1x1 lateral convs to ``width`` channels, nearest upsampling, a 3x3 merge."""

    def __init__(self, in_channels: tuple[int, int, int], width: int):
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(c, width, kernel=1) for c in in_channels)
        self.merge1, self.merge2 = _conv_bn(width, width), _conv_bn(width, width)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p1, p2, p3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        return [p1, p2, p3]  # (B, width, H/s, W/s) for s = 8, 16, 32


class ContextModule(nn.Module):
    """SSH context: 3x3, 5x5 and 7x7 receptive fields (stacked 3x3 convs, the larger two sharing the
    first), concatenated to ``width`` channels, then ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.conv3X3 = _conv_bn(width, width // 2, relu=False)
        self.conv5X5_1 = _conv_bn(width, width // 4)
        self.conv5X5_2 = _conv_bn(width // 4, width // 4, relu=False)
        self.conv7X7_2 = _conv_bn(width // 4, width // 4)
        self.conv7x7_3 = _conv_bn(width // 4, width // 4, relu=False)  # lower-case x: the state dict's name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.conv5X5_1(x)
        five = self.conv5X5_2(shared)
        seven = self.conv7x7_3(self.conv7X7_2(shared))
        return F.relu(torch.cat([self.conv3X3(x), five, seven], dim=1))  # (B, width, h, w)


class _Head(nn.Module):
    """A 1x1 conv giving ``per_anchor`` numbers for each of ``anchors`` anchors per cell."""

    def __init__(self, width: int, anchors: int, per_anchor: int):
        super().__init__()
        self.conv1x1 = nn.Conv2d(width, anchors * per_anchor, 1)
        self.per_anchor = per_anchor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        # (B, A*k, h, w) -> (B, h, w, A*k) -> (B, h*w*A, k): anchors in row-major cell order, as the priors
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(b, -1, self.per_anchor)


class RetinaFace(nn.Module):
    """RetinaFace, MobileNet-0.25 (about 0.4 M parameters).

    forward(x): x (B, 3, H, W) float, BGR minus `BGR_MEAN` -> (boxes (B, P, 4), logits (B, P, 2),
    points (B, P, 10)): per prior, box offsets in the `VARIANCE` encoding, face/background logits
    (face is index 1) and five-point offsets. P = sum over the three levels of
    ceil(H/s) * ceil(W/s) * 2 (`priors`).
    """

    def __init__(self, width: int = 64, anchors: int = 2):
        super().__init__()
        self.body = MobileNetQuarter()
        self.fpn = FeaturePyramid((64, 128, 256), width)
        self.ssh1, self.ssh2, self.ssh3 = ContextModule(width), ContextModule(width), ContextModule(width)
        self.ClassHead = nn.ModuleList(_Head(width, anchors, 2) for _ in STEPS)
        self.BboxHead = nn.ModuleList(_Head(width, anchors, 4) for _ in STEPS)
        self.LandmarkHead = nn.ModuleList(_Head(width, anchors, 10) for _ in STEPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.fpn(self.body(x))
        feats = [self.ssh1(p[0]), self.ssh2(p[1]), self.ssh3(p[2])]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, feats)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, feats)], dim=1)
        points = torch.cat([head(f) for head, f in zip(self.LandmarkHead, feats)], dim=1)
        return boxes, logits, points


def load_state_dict(path: str | os.PathLike = WEIGHTS) -> dict[str, torch.Tensor]:
    """The published state dict, read as tensors only (``weights_only``: no pickled code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def priors(height: int, width: int) -> torch.Tensor:
    """(P, 4) anchors (cx, cy, w, h) as fractions of the image, in the heads' order: level, row,
    column, then the level's two sizes."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid((torch.arange(rows) + 0.5) * step / height, (torch.arange(cols) + 0.5) * step / width,
                                indexing="ij")
        for_size = [torch.stack([cx, cy, torch.full_like(cx, s / width), torch.full_like(cy, s / height)], -1)
                    for s in sizes]  # each (rows, cols, 4)
        out.append(torch.stack(for_size, dim=2).reshape(-1, 4))  # (rows, cols, 2, 4) -> (rows*cols*2, 4)
    return torch.cat(out)


def decode(boxes: torch.Tensor, points: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets (P, 4), (P, 10) and anchors (P, 4) -> boxes (P, 4) x0, y0, x1, y1 and points (P, 5, 2),
    as fractions of the image."""
    centre = anchors[:, :2] + boxes[:, :2] * VARIANCE[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(boxes[:, 2:] * VARIANCE[1])
    pts = anchors[:, None, :2] + points.reshape(-1, 5, 2) * VARIANCE[0] * anchors[:, None, 2:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=1), pts


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices of the boxes (N, 4) kept by greedy non-maximum suppression, best score first."""
    order = torch.argsort(scores, descending=True)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep = []
    while order.numel():
        i, rest = order[0], order[1:]
        keep.append(int(i))
        lo = torch.maximum(boxes[i, :2], boxes[rest, :2])  # (R, 2)
        hi = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (hi - lo).clamp(min=0).prod(dim=1)
        order = rest[inter / (area[i] + area[rest] - inter).clamp(min=1e-9) <= iou]
    return torch.tensor(keep, dtype=torch.long)


@dataclass(frozen=True)
class Detection:
    """One face found by RetinaFace, in the image's pixels."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float  # face probability
    points: np.ndarray  # (5, 2) x, y: left eye, right eye, nose tip, left and right mouth corner (image's left/right)


class RetinaFaceDetector:
    """RetinaFace MobileNet-0.25 on CPU (or ``device``), weights loaded strictly.

    Args:
        weights: the state dict (default: the one shipped in ``letstalk/weights``).
        min_score: faces below this probability are dropped (the authors' demo shows faces >= 0.6).
        nms_iou: overlapping boxes above this IoU are merged into the best one.
        max_side: images larger than this are scaled down for the network (boxes come back in the
            image's own pixels); None: always the image's own size.
    """

    def __init__(self, weights: str | os.PathLike = WEIGHTS, min_score: float = 0.6, nms_iou: float = 0.4,
                 max_side: int | None = 1280, device: str | torch.device = "cpu"):
        self.net = RetinaFace()
        self.net.load_state_dict(load_state_dict(weights), strict=True)
        self.net.eval().to(device)
        self.device, self.min_score, self.nms_iou, self.max_side = torch.device(device), min_score, nms_iou, max_side
        self._priors: dict[tuple[int, int], torch.Tensor] = {}

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an (H, W, 3) uint8 RGB image, best score first."""
        h, w = image.shape[:2]
        scale = 1.0 if self.max_side is None else min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        sh, sw = image.shape[:2]
        # RGB -> BGR minus the means, (H, W, 3) -> (1, 3, H, W)
        x = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).to(self.device, torch.float32)
        x = (x - torch.tensor(BGR_MEAN, device=self.device)).permute(2, 0, 1)[None]
        boxes, logits, points = self.net(x)
        scores = logits[0].softmax(dim=-1)[:, 1]  # (P,)
        keep = scores >= self.min_score
        if not keep.any():
            return []
        if (sh, sw) not in self._priors:
            self._priors = {(sh, sw): priors(sh, sw).to(self.device)}  # one size per video: keep the last
        box, pts = decode(boxes[0][keep], points[0][keep], self._priors[(sh, sw)][keep])
        scores = scores[keep]
        kept = nms(box, scores, self.nms_iou)
        to_px = torch.tensor([w, h], device=self.device, dtype=torch.float32)  # fractions -> the input's pixels
        box = (box[kept].reshape(-1, 2, 2) * to_px).reshape(-1, 4).cpu().numpy()
        pts = (pts[kept] * to_px).cpu().numpy()
        return [Detection(tuple(float(v) for v in b), float(s), p.astype(np.float32))
                for b, s, p in zip(box, scores[kept].cpu().numpy(), pts)]
