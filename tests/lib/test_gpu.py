"""GPU checks (marker `gpu`): run on a machine with CUDA, `pytest -m gpu`."""

import pytest
import torch

from letstalk import LetsTalkTransformer
from letstalk.diffusion import GaussianDiffusion

pytestmark = pytest.mark.gpu


def test_bf16_forward_matches_fp32_on_gpu():
    torch.manual_seed(0)
    model = LetsTalkTransformer.from_preset("S").cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = model.cfg
    x = torch.randn(2, 16, 4, 32, 32, device="cuda")
    t = torch.tensor([10, 900], device="cuda")
    portrait = torch.randn(2, 4, 32, 32, device="cuda")
    audio = torch.randn(2, 16, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim, device="cuda")
    motion = torch.randn(2, 2, 4, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model(x, t, portrait, audio, motion)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, t, portrait, audio, motion).float()
    assert (low - ref).norm() / ref.norm() < 0.05


def test_training_step_on_gpu_reduces_loss():
    torch.manual_seed(0)
    model = LetsTalkTransformer.from_preset("tiny").cuda()
    diffusion = GaussianDiffusion()
    cfg = model.cfg
    x0 = torch.randn(4, cfg.num_frames, 4, 8, 8, device="cuda")
    portrait = torch.randn(4, 4, 8, 8, device="cuda")
    audio = torch.randn(4, cfg.num_frames, 5, 4, 32, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    t = torch.full((4,), 500, device="cuda")
    noise = torch.randn_like(x0)
    first = None
    for _ in range(50):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = diffusion.training_losses(lambda xt, tt: model(xt, tt, portrait, audio), x0, t, noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first / 2
