"""Frames <-> latents through a frozen Stable Diffusion VAE (diffusers AutoencoderKL)."""

from __future__ import annotations

import os

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
        kwargs = {"subfolder": subfolder} if subfolder else {}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        vae = AutoencoderKL.from_pretrained(path_or_id, **kwargs)
        if device is not None:
            vae = vae.to(device)
        return cls(vae, slice_size=slice_size)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.vae.save_pretrained(path)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

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


def tiny_codec(seed: int = 0) -> LatentCodec:
    """A random-initialised small AutoencoderKL with SD's layout (×8 down, 4 channels) for tests/demos."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), scaling_factor=SD_SCALING_FACTOR,
    )
    return LatentCodec(vae)
