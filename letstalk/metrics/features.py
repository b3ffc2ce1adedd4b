"""Feature networks for FID, FVD and E-FID, loaded from local weight files (no model hub).

Supported files (what `load_*` accept):

* Inception (FID): NVlabs' TorchScript `inception-2015-12-05.pt` (StyleGAN2-ADA / StyleGAN3
  metrics; also distributed as `pt_inception-2015-12-05-*.pt`), called as
  ``net(images_uint8_NCHW, return_features=True) -> (N, 2048)`` pool features; it resizes to
  299² itself. torch-fidelity's `.pth` state dict is not supported: it needs torch-fidelity's
  own network code, which this project does not depend on.
* I3D (FVD): the TorchScript `i3d_torchscript.pt` of StyleGAN-V / fvd-comparison, called as
  ``net(videos, rescale=False, resize=False, return_features=True) -> (N, 400)`` on
  videos (N, 3, 16, 224, 224) float in [-1, 1] (we resize to 224² and rescale ourselves).
* Deep3DFaceRecon (E-FID): the released checkpoint `epoch_20.pth` (a dict whose "net_recon" is
  the state dict of a torchvision-layout ResNet-50 `backbone` plus 7 1×1-conv `final_layers`
  giving 80 identity, 64 expression, 80 texture, 3 angle, 27 lighting, 2+1 translation
  coefficients = 257), or a TorchScript module with the same input and a (N, 257) or (N, 64)
  output. Input: (N, 3, 224, 224) RGB float in [0, 1]. Expression = coefficients 80:144.
  The authors align faces with 5 landmarks first; we feed the face-centred crop of
  `letstalk.portrait.crop_portrait` resized to 224², so absolute E-FID values are not
  comparable with published ones (relative comparisons between models are).

Each `load_*` raises ValueError (one line, naming the file) for a missing or unreadable file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["InceptionFeatures", "I3DFeatures", "ExpressionFeatures", "FaceReconNet", "load_inception", "load_i3d",
           "load_face_recon", "EXPRESSION_SLICE", "FVD_CLIP_FRAMES"]

EXPRESSION_SLICE = slice(80, 144)
FACE_RECON_COEFFS = (80, 64, 80, 3, 27, 2, 1)  # id, exp, tex, angle, gamma, xy, z
FVD_CLIP_FRAMES = 16


def _check_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} weights {str(p)!r} not found")
    return p


def _torchscript(path: Path, device: str | torch.device) -> torch.jit.ScriptModule:
    # TorchScript is deprecated in torch 2.13 but it is the format these weights are published in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device)


def _jit_load(path: Path, device: str | torch.device, what: str) -> torch.jit.ScriptModule:
    try:
        return _torchscript(path, device).eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a TorchScript {what} file ({' '.join(str(e).split())[:160]})") from None


def _frames_tensor(frames: np.ndarray) -> torch.Tensor:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("no frames")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8


def _check_output(out, n: int, what: str) -> np.ndarray:
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = out.detach().float().reshape(n, -1).cpu().numpy().astype(np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{what} produced NaN or infinite features")
    return out


class InceptionFeatures:
    """uint8 frames (N, H, W, 3) -> Inception pool features (N, D), in batches."""

    def __init__(self, net: torch.jit.ScriptModule, device: str | torch.device = "cpu", batch_size: int = 32):
        self.net, self.device, self.batch_size = net, torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = _frames_tensor(frames)
        out = [_check_output(self.net(chunk.to(self.device), return_features=True), len(chunk), "Inception")
               for chunk in x.split(self.batch_size)]
        return np.concatenate(out)


class I3DFeatures:
    """uint8 videos (N, T, H, W, 3) -> I3D features (N, D); T must be `FVD_CLIP_FRAMES`."""

    def __init__(self, net: torch.jit.ScriptModule, device: str | torch.device = "cpu", batch_size: int = 4,
                 size: int = 224):
        self.net, self.device, self.batch_size, self.size = net, torch.device(device), batch_size, size

    @torch.no_grad()
    def __call__(self, videos: np.ndarray) -> np.ndarray:
        videos = np.asarray(videos)
        if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
            raise ValueError(f"videos must be uint8 (N, T, H, W, 3), got {videos.dtype} {videos.shape}")
        if videos.shape[1] != FVD_CLIP_FRAMES:
            raise ValueError(f"FVD clips must have {FVD_CLIP_FRAMES} frames, got {videos.shape[1]}")
        out = []
        for chunk in np.array_split(videos, max(1, -(-len(videos) // self.batch_size))):
            n, t = chunk.shape[:2]
            x = _frames_tensor(chunk.reshape(n * t, *chunk.shape[2:])).float().to(self.device)  # (n t, 3, H, W)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            x = (x / 127.5 - 1.0).reshape(n, t, 3, self.size, self.size).permute(0, 2, 1, 3, 4)  # (n, 3, t, S, S)
            out.append(_check_output(self.net(x.contiguous(), rescale=False, resize=False, return_features=True),
                                     n, "I3D"))
        return np.concatenate(out)


class ExpressionFeatures:
    """uint8 face crops (N, H, W, 3) -> Deep3DFaceRecon expression coefficients (N, 64)."""

    def __init__(self, net: nn.Module, device: str | torch.device = "cpu", batch_size: int = 32, size: int = 224):
        self.net, self.device, self.batch_size, self.size = net, torch.device(device), batch_size, size

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = _frames_tensor(frames)
        out = []
        for chunk in x.split(self.batch_size):
            y = F.interpolate(chunk.float().to(self.device) / 255.0, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)  # (n, 3, 224, 224) in [0, 1]
            coeffs = _check_output(self.net(y), len(chunk), "the face reconstruction network")
            if coeffs.shape[1] == sum(FACE_RECON_COEFFS):
                coeffs = coeffs[:, EXPRESSION_SLICE]
            elif coeffs.shape[1] != FACE_RECON_COEFFS[1]:
                raise ValueError(f"the face reconstruction network gives {coeffs.shape[1]} coefficients; expected "
                                 f"{sum(FACE_RECON_COEFFS)} (all) or {FACE_RECON_COEFFS[1]} (expression)")
            out.append(coeffs)
        return np.concatenate(out)


# ------------------------------------------------------------------------------ Deep3DFaceRecon


class _Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (v1.5: the stride sits on the 3×3 conv); same parameter names."""

    def __init__(self, inplanes: int, planes: int, out: int, stride: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                        nn.BatchNorm2d(out)) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _ResNetBackbone(nn.Module):
    """torchvision-layout ResNet without its fc: (N, 3, H, W) -> (N, C, 1, 1)."""

    def __init__(self, width: int, blocks: tuple[int, ...], planes: tuple[int, ...], expansion: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        inplanes = width
        for k, (n, p) in enumerate(zip(blocks, planes), start=1):
            layers = []
            for i in range(n):
                stride = 2 if (i == 0 and k > 1) else 1
                layers.append(_Bottleneck(inplanes, p, p * expansion, stride,
                                          downsample=i == 0 and (stride != 1 or inplanes != p * expansion)))
                inplanes = p * expansion
            setattr(self, f"layer{k}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.out_channels = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for k in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{k}")(x)
        return F.adaptive_avg_pool2d(x, 1)


class FaceReconNet(nn.Module):
    """Deep3DFaceRecon's ReconNetWrapper: ResNet backbone + 1×1-conv heads -> (N, 257) coefficients.

    The default sizes are ResNet-50's; tests build a small network of the same layout.

    Args:
        x: (N, 3, 224, 224) RGB float in [0, 1].
    """

    def __init__(self, width: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3),
                 planes: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.backbone = _ResNetBackbone(width, tuple(blocks), tuple(planes))
        self.final_layers = nn.ModuleList(nn.Conv2d(self.backbone.out_channels, c, 1) for c in FACE_RECON_COEFFS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(x)  # (N, C, 1, 1)
        return torch.cat([head(feat) for head in self.final_layers], dim=1).flatten(1)  # (N, 257)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "FaceReconNet":
        """Build the network whose sizes the state dict implies (ResNet-50 for epoch_20.pth) and load it."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if "backbone.conv1.weight" not in state:
            raise ValueError("no backbone.conv1.weight: not a Deep3DFaceRecon net_recon state dict")
        stages: dict[int, set[int]] = {}
        for key in state:
            m = re.match(r"backbone\.layer(\d+)\.(\d+)\.", key)
            if m:
                stages.setdefault(int(m[1]), set()).add(int(m[2]))
        if not stages or sorted(stages) != list(range(1, len(stages) + 1)):
            raise ValueError("the backbone's layer1..layerN blocks are missing or out of order")
        blocks = tuple(len(stages[k]) for k in sorted(stages))
        planes = tuple(int(state[f"backbone.layer{k}.0.conv1.weight"].shape[0]) for k in sorted(stages))
        net = cls(int(state["backbone.conv1.weight"].shape[0]), blocks, planes)
        missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("backbone.fc.")},
                                                  strict=False)
        if missing or unexpected:
            raise ValueError(f"the state dict does not match the Deep3DFaceRecon layout (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return net


# ------------------------------------------------------------------------------------ loaders


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> InceptionFeatures:
    """NVlabs' TorchScript Inception (see the module docstring)."""
    return InceptionFeatures(_jit_load(_check_file(path, "Inception"), device, "Inception"), device)


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> I3DFeatures:
    """The TorchScript I3D of StyleGAN-V / fvd-comparison (see the module docstring)."""
    return I3DFeatures(_jit_load(_check_file(path, "I3D"), device, "I3D"), device)


def load_face_recon(path: str | os.PathLike, device: str | torch.device = "cpu") -> ExpressionFeatures:
    """Deep3DFaceRecon's epoch_20.pth (state dict) or a TorchScript export (see the module docstring)."""
    p = _check_file(path, "Deep3DFaceRecon")
    try:
        net: nn.Module = _torchscript(p, device)
    except (RuntimeError, ValueError):  # not TorchScript: a checkpoint of state dicts
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle/zip errors come in many types; report them in one line
            raise ValueError(f"{p}: neither TorchScript nor a readable checkpoint "
                             f"({' '.join(str(e).split())[:160]})") from None
        if not isinstance(ckpt, dict):
            raise ValueError(f"{p}: expected a checkpoint dict, got {type(ckpt).__name__}")
        state = ckpt.get("net_recon", ckpt)
        try:
            net = FaceReconNet.from_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        net = net.to(device)
    return ExpressionFeatures(net.eval(), device)
