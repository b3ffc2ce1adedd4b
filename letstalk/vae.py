"""Frames <-> latents: a frozen Stable Diffusion VAE (diffusers AutoencoderKL), or a lossless
space-to-depth codec with the same interface (the CPU demo's codec).

Both save to / load from a bundle's vae/ folder; `LatentCodec.from_pretrained` (and `load_codec`)
read its config.json and return whichever codec it describes, so every caller (preprocessing,
training samples, the render pipeline) works with either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

DEFAULT_VAE = "CompVis/stable-diffusion-v1-4"  # subfolder "vae"
SD_SCALING_FACTOR = 0.18215


class LatentCodec:
    """uint8 RGB frames (N, H, W, 3) <-> scaled latents (N, 4, H/8, W/8).

    Encoding takes the posterior mean (deterministic); both directions run in slices of
    `slice_size` frames to bound memory on long videos.
    """

    def __init__(self, vae: AutoencoderKL, slice_size: int = 8):
        self.vae = vae.eval().requires_grad_(False)
        self.slice_size = slice_size
        self.scaling_factor = float(vae.config.scaling_factor or SD_SCALING_FACTOR)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike = DEFAULT_VAE, *, subfolder: str | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        slice_size: int = 8) -> "LatentCodec":
        if subfolder is None and str(path_or_id) == DEFAULT_VAE:
            subfolder = "vae"
        if SpaceToDepthCodec.is_saved_at(Path(path_or_id) / (subfolder or "")):
            return SpaceToDepthCodec.from_pretrained(Path(path_or_id) / (subfolder or ""), device=device)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        vae = AutoencoderKL.from_pretrained(path_or_id, **kwargs)
        if device is not None:
            vae = vae.to(device)
        return cls(vae, slice_size=slice_size)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.vae.save_pretrained(path)

    def to(self, device: str | torch.device) -> "LatentCodec":
        self.vae.to(device)
        return self

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def sample_range(self) -> float | None:
        """Latents have no fixed range: samplers must not clip the predicted x0."""
        return None

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, C, H/8, W/8) float32 latents × scaling_factor."""
        frames = torch.from_numpy(np.array(frames))  # a copy: Ray hands out read-only arrays
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 with shape (N, H, W, 3), got {tuple(frames.shape)} {frames.dtype}")
        if frames.shape[1] % self.downsample or frames.shape[2] % self.downsample:
            raise ValueError(f"frame size {tuple(frames.shape[1:3])} must be a multiple of {self.downsample}")
        p = self._param()
        out = []
        for chunk in frames.split(self.slice_size):
            x = chunk.permute(0, 3, 1, 2).to(device=p.device, dtype=p.dtype) / 127.5 - 1.0  # (n, 3, H, W)
            out.append(self.vae.encode(x).latent_dist.mean.float() * self.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(N, C, h, w) latents -> (N, 8h, 8w, 3) uint8 frames."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape (N, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        p = self._param()
        out = []
        for chunk in latents.split(self.slice_size):
            x = self.vae.decode(chunk.to(device=p.device, dtype=p.dtype) / self.scaling_factor).sample
            out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy()


class SpaceToDepthCodec:
    """Space-to-depth codec: uint8 RGB frames (N, H, W, 3) <-> latents (N, C, H/f, W/f).

    Pixels are mapped to [-1, 1] and each f×f block becomes 3·f² channels (pixel_unshuffle; channel
    order c·f² + dy·f + dx), times `scaling_factor`: lossless up to uint8 rounding, no weights (the
    vae/ folder holds only config.json), C = 3·f².

    With a `basis` (k, 3·f²) of orthonormal rows and a `mean` (3·f²,) — a PCA of the block vectors
    of one person's frames (`fit`) — the latents are the k coefficients of (block − mean) on the
    basis: C = k channels, lossy but an isometry on the kept subspace (on 64² face crops, 16 of 48
    components keep 39.6 dB PSNR). Fewer channels make each 2×2 patch token 4·k values instead of
    192, which a small transformer's residual stream can carry together with the noise (docs/avatar.md).
    The basis is saved as basis.safetensors beside config.json.

    Latents are bounded (pixels are), so samplers clip the predicted x0 to ±`sample_range`.

    Args:
        factor: downsampling factor f (frame side / latent side).
        scaling_factor: latents = pixels in [-1, 1] (or their coefficients) × scaling_factor.
    """

    CLASS_NAME = "SpaceToDepthCodec"

    def __init__(self, factor: int = 4, scaling_factor: float = 1.0, basis: torch.Tensor | None = None,
                 mean: torch.Tensor | None = None):
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        self.factor, self.scaling_factor = int(factor), float(scaling_factor)
        self.device = torch.device("cpu")
        full = 3 * self.factor**2
        if (basis is None) != (mean is None):
            raise ValueError("give both basis and mean, or neither")
        if basis is not None:
            basis, mean = torch.as_tensor(basis, dtype=torch.float32), torch.as_tensor(mean, dtype=torch.float32)
            if basis.ndim != 2 or basis.shape[1] != full or not 1 <= basis.shape[0] <= full or mean.shape != (full,):
                raise ValueError(f"basis must be (k, {full}) with 1 <= k <= {full} and mean ({full},), got "
                                 f"{tuple(basis.shape)} and {tuple(mean.shape)}")
        self.basis, self.mean = basis, mean

    @classmethod
    def fit(cls, frames: np.ndarray, factor: int = 4, channels: int = 16, max_frames: int = 400) -> "SpaceToDepthCodec":
        """A codec whose basis is the top `channels` principal components of the f×f blocks of
        (N, H, W, 3) uint8 `frames` (at most `max_frames` of them, evenly spaced)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise ValueError(f"frames must be uint8 with shape (N, H, W, 3), got {frames.dtype} {frames.shape}")
        idx = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
        blocks = cls(factor).encode(frames[idx]).permute(0, 2, 3, 1).reshape(-1, 3 * factor**2).double()
        if not 1 <= channels <= min(blocks.shape):
            raise ValueError(f"channels must be 1..{min(blocks.shape)} for {len(blocks)} blocks of "
                             f"{blocks.shape[1]} values, got {channels}")
        mean = blocks.mean(dim=0)
        # the right singular vectors of the centred blocks, largest first: the principal components
        # (an SVD of the N × 3f² data, not an eigendecomposition of the 3f² × 3f² covariance: at
        # f = 64 that matrix is 12288²)
        _, _, vh = torch.linalg.svd(blocks - mean, full_matrices=False)
        return cls(factor, basis=vh[:channels].float(), mean=mean.float())

    @property
    def downsample(self) -> int:
        return self.factor

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2 if self.basis is None else int(self.basis.shape[0])

    @property
    def sample_range(self) -> float:
        if self.basis is None:
            return self.scaling_factor
        # a coefficient of a block minus the mean: at most the length of a difference of two blocks in [-1, 1]
        return self.scaling_factor * 2.0 * (3 * self.factor**2) ** 0.5

    def config(self) -> dict:
        cfg = {"_class_name": self.CLASS_NAME, "factor": self.factor, "scaling_factor": self.scaling_factor}
        return cfg if self.basis is None else cfg | {"basis_channels": self.latent_channels}

    @classmethod
    def is_saved_at(cls, path: str | os.PathLike) -> bool:
        cfg = Path(path) / "config.json"
        try:
            return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == cls.CLASS_NAME
        except ValueError:
            return False

    def save_pretrained(self, path: str | os.PathLike) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        if self.basis is not None:
            from safetensors.torch import save_file

            save_file({"basis": self.basis.contiguous().cpu(), "mean": self.mean.contiguous().cpu()},
                      str(Path(path) / "basis.safetensors"))
        (Path(path) / "config.json").write_text(json.dumps(self.config(), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "SpaceToDepthCodec":
        """`dtype` is accepted for interface parity and ignored: latents are float32."""
        cfg = json.loads((Path(path) / "config.json").read_text())
        if cfg.get("_class_name") != cls.CLASS_NAME:
            raise ValueError(f"{path}/config.json does not describe a {cls.CLASS_NAME}")
        basis = mean = None
        if cfg.get("basis_channels"):
            from safetensors.torch import load_file

            tensors = load_file(str(Path(path) / "basis.safetensors"))
            basis, mean = tensors["basis"], tensors["mean"]
            if basis.shape[0] != cfg["basis_channels"]:
                raise ValueError(f"{path}: basis.safetensors has {basis.shape[0]} rows, config.json says "
                                 f"{cfg['basis_channels']}")
        codec = cls(cfg["factor"], cfg.get("scaling_factor", 1.0), basis, mean)
        return codec.to(device) if device is not None else codec

    def to(self, device: str | torch.device) -> "SpaceToDepthCodec":
        self.device = torch.device(device)
        if self.basis is not None:
            self.basis, self.mean = self.basis.to(self.device), self.mean.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, C, H/f, W/f) float32 latents (module docstring)."""
        frames = torch.from_numpy(np.array(frames)) if not isinstance(frames, torch.Tensor) else frames
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 with shape (N, H, W, 3), got {tuple(frames.shape)} {frames.dtype}")
        if frames.shape[1] % self.factor or frames.shape[2] % self.factor:
            raise ValueError(f"frame size {tuple(frames.shape[1:3])} must be a multiple of {self.factor}")
        x = frames.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)
        blocks = torch.nn.functional.pixel_unshuffle(x, self.factor)  # (N, 3f², H/f, W/f)
        if self.basis is not None:
            blocks = torch.einsum("kc,nchw->nkhw", self.basis, blocks - self.mean[None, :, None, None])
        return blocks * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(N, C, h, w) latents -> (N, f·h, f·w, 3) uint8 frames."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape (N, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        blocks = latents.float().to(self.device) / self.scaling_factor
        if self.basis is not None:
            blocks = torch.einsum("kc,nkhw->nchw", self.basis, blocks) + self.mean[None, :, None, None]
        x = torch.nn.functional.pixel_shuffle(blocks, self.factor)  # (N, 3, H, W)
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


Codec = LatentCodec | SpaceToDepthCodec


def load_codec(path: str | os.PathLike, **kwargs) -> Codec:
    """The codec saved at `path` (a bundle's vae/ folder), whichever kind it is."""
    return LatentCodec.from_pretrained(path, **kwargs)


def codec_downsample(path: str | os.PathLike) -> int:
    """Frame side / latent side of the codec saved at `path`, from its config.json alone."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    if cfg.get("_class_name") == SpaceToDepthCodec.CLASS_NAME:
        return int(cfg["factor"])
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def tiny_codec(seed: int = 0) -> LatentCodec:
    """A random-initialised small AutoencoderKL with SD's layout (×8 down, 4 channels) for tests/demos."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), scaling_factor=SD_SCALING_FACTOR,
    )
    return LatentCodec(vae)
