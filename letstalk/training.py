"""Training pieces that need no runtime: batch augmentation, the loss step, EMA, Latte init.

The Ray Train + DeepSpeed loop (letstalk_platform.train) calls these; tests run them on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .audio import windows_from_context
from .diffusion import ClipTarget, GaussianDiffusion, mean_flat
from .revoice import condition
from .transformer import LetsTalkTransformer


@dataclass(frozen=True)
class Augment:
    """Per-sample randomness of a training batch.

    flip_prob: horizontal flip of clip, motion and reference together (latents of a flipped image
        are close to flipped latents for the SD VAE, as in Latte/Hallo's latent-space flips).
    audio_dropout: probability that a sample's audio features are zeroed (the unconditional
        branch that classifier-free guidance needs).
    motion_noise: motion latents get Gaussian noise of std U(0, motion_noise), so that the model
        tolerates imperfect generated motion frames at inference (drift).
    motion_ref_prob: probability that the motion frames are replaced by the reference latent, the
        way the first clip of a video is rendered.
    """

    flip_prob: float = 0.5
    audio_dropout: float = 0.1
    motion_noise: float = 0.1
    motion_ref_prob: float = 0.1


def prepare_batch(batch: dict[str, torch.Tensor], augment: Augment, audio_window: int,
                  generator: torch.Generator | None = None, target: ClipTarget = ClipTarget(),
                  cond_mask: torch.Tensor | None = None, motion_frames: int | None = None) -> dict[str, torch.Tensor]:
    """Shard columns (letstalk.clips layout) -> model inputs, float32, on the batch's device.

    batch: latents (B, F, C, h, w), audio (B, F + window - 1, layers, D), motion (B, M, C, h, w),
           refs (B, K, C, h, w).
    Returns x0 (B, F, C, h, w), portrait (B, C, h, w), audio (B, F, window, layers, D), motion.
    target: how x0 is made from the clip and its portrait (ClipTarget: the clip, or (clip - portrait) · scale).
    cond_mask: (h, w) 0/1 mask of a re-voicing model (letstalk.revoice): the result also holds
        cond (B, F, C + 1, h, w), each frame's own latent with the masked cells zeroed, and the mask.
    motion_frames: keep only the last this many motion frames (a model with fewer than the shards hold).
    """
    x0 = batch["latents"].float()
    b, dev = x0.shape[0], x0.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    refs = batch["refs"].float()
    pick = (rand(b) * refs.shape[1]).long().clamp(max=refs.shape[1] - 1)
    portrait = refs[torch.arange(b, device=dev), pick]  # (B, C, h, w): a frame from outside the clip
    audio = windows_from_context(batch["audio"].float(), audio_window)  # (B, F, window, layers, D)
    motion = batch["motion"].float()
    if motion_frames is not None:
        motion = motion[:, motion.shape[1] - min(motion_frames, motion.shape[1]):]

    if motion.shape[1] > 0:
        sigma = rand(b) * augment.motion_noise
        noise = torch.randn(motion.shape, generator=generator, device="cpu").to(dev)
        motion = motion + sigma.view(b, 1, 1, 1, 1) * noise
        use_ref = (rand(b) < augment.motion_ref_prob).view(b, 1, 1, 1, 1)
        motion = torch.where(use_ref, portrait[:, None].expand_as(motion), motion)
    keep = (rand(b) >= augment.audio_dropout).view(b, 1, 1, 1, 1).float()
    audio = audio * keep
    flip = rand(b) < augment.flip_prob
    if flip.any():
        x0 = torch.where(flip.view(b, 1, 1, 1, 1), x0.flip(-1), x0)
        motion = torch.where(flip.view(b, 1, 1, 1, 1), motion.flip(-1), motion)
        portrait = torch.where(flip.view(b, 1, 1, 1), portrait.flip(-1), portrait)
    cond = None if cond_mask is None else condition(x0, cond_mask)
    x0 = target.encode(x0, target.base_latent(portrait, motion))  # the motion frames as the model sees them
    out = {"x0": x0, "portrait": portrait, "audio": audio, "motion": motion}
    if cond is not None:
        out["cond"] = cond
    return out


def motion_weights(x0: torch.Tensor, strength: float) -> torch.Tensor:
    """(B, F, C, h, w) clip -> (B, 1, 1, h, w) loss weights 1 + strength · (how much each latent pixel
    moves over the clip, relative to the clip's mean), normalised to mean 1 per sample.

    With the residual target the moving parts (mouth, eyes) are a few % of the pixels, so the plain
    MSE barely rewards getting the mouth right; this shifts the loss towards them.
    """
    if strength < 0:
        raise ValueError(f"motion weight strength must be >= 0, got {strength}")
    spread = x0.float().std(dim=1, keepdim=True).mean(dim=2, keepdim=True)  # (B, 1, 1, h, w)
    w = 1 + strength * spread / (spread.mean(dim=(-1, -2), keepdim=True) + 1e-8)
    return w / w.mean(dim=(-1, -2), keepdim=True)


def mask_weights(cond: torch.Tensor, unmasked: float) -> torch.Tensor:
    """(B, F, C + 1, h, w) re-voicing condition -> (B, F, 1, h, w) loss weights: 1 in the cells the
    condition hides (the lower face the model regenerates), `unmasked` in the cells it shows (which
    the composite takes from the footage itself), normalised to mean 1 per frame."""
    if not 0 <= unmasked <= 1:
        raise ValueError(f"unmasked weight must be in [0, 1], got {unmasked}")
    m = cond[:, :, -1:].float()
    w = unmasked + (1 - unmasked) * m
    return w / w.mean(dim=(-1, -2), keepdim=True).clamp_min(1e-8)


def loss_terms(model, diffusion: GaussianDiffusion, inputs: dict[str, torch.Tensor],
               generator: torch.Generator | None = None, motion_weight: float = 0.0,
               unmasked_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """One diffusion training step's losses (batch means): loss, mse, vb. `model` may be a wrapper.

    motion_weight > 0 weights the MSE towards the parts of the clip that move (`motion_weights`);
    unmasked_weight < 1, for a re-voicing model, towards the masked lower face (`mask_weights`).
    """
    x0 = inputs["x0"]
    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=generator, device="cpu").to(x0.device)
    weight = motion_weights(x0, motion_weight) if motion_weight > 0 else None
    cond = inputs.get("cond")
    if cond is not None and unmasked_weight < 1:
        w = mask_weights(cond, unmasked_weight)
        weight = w if weight is None else weight * w / (weight * w).mean(dim=(-1, -2), keepdim=True)
    extra = {} if cond is None else {"cond": cond}
    terms = diffusion.training_losses(
        lambda x, tt: model(x, tt, inputs["portrait"], inputs["audio"], inputs["motion"], **extra), x0, t,
        weight=weight)
    return {k: v.mean() for k, v in terms.items()}


def distill_loss_terms(student, teacher, diffusion: GaussianDiffusion, inputs: dict[str, torch.Tensor],
                       student_steps: int, substeps: int, guidance: float = 1.0, clip_range: float | None = None,
                       generator: torch.Generator | None = None, motion_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """One few-step distillation step's losses (batch means): loss, mse.

    Each sample gets a step of the student's `student_steps`-step DDIM grid, t -> s; x_t is its
    clip noised to t (the first step starts from pure noise, as sampling does); the teacher (audio
    guidance `guidance` baked in) takes `substeps` DDIM steps from x_t to x_s, and the student learns,
    in one step, the x0 that lands on the same x_s (`GaussianDiffusion.teacher_x0_target`). The
    loss is the MSE of the x0 the student implies, weighted as the training loss is (motion_weight).
    The student's variance channels get no loss: DDIM does not use them.
    """
    x0 = inputs["x0"]
    b = x0.shape[0]
    grid = diffusion.student_timesteps(student_steps)
    pick = torch.randint(0, student_steps, (b,), generator=generator, device="cpu")
    t = torch.tensor(grid[:-1])[pick].to(x0.device)
    s = torch.tensor(grid[1:])[pick].to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
    xt = diffusion.q_sample(x0, t, noise)
    cond = (inputs["portrait"], inputs["audio"], inputs["motion"])
    extra = {} if inputs.get("cond") is None else {"cond": inputs["cond"]}
    target = diffusion.teacher_x0_target(
        lambda x, tt: teacher.forward_with_guidance(x, tt, *cond, guidance=guidance, **extra), xt, t, s, substeps,
        clip_range)
    pred, _ = diffusion.split_output(student(xt, t, *cond, **extra).float(), xt)
    err = (diffusion.pred_x0(pred, xt, t) - target) ** 2
    if motion_weight > 0:
        err = err * motion_weights(x0, motion_weight)
    mse = mean_flat(err).mean()
    return {"loss": mse, "mse": mse}


class EMA:
    """Exponential moving average of parameters, kept in fp32 on the parameters' device.

    `params` are the tensors to track, by name: a model's parameters, or whatever holds the weights
    the optimizer steps (the platform passes each rank's flat fp32 master partitions under ZeRO, so
    the average is fp32 and sharded like the optimizer state).

    warmup: use decay min(decay, (1 + n) / (10 + n)) at the n-th update, so that a short run's
    average is not dominated by the random initial weights (0.9999 forgets them only after ~10⁴
    steps). `updates` counts the updates; a resumed run sets it (it is not in the state dict).
    """

    def __init__(self, params: dict[str, torch.Tensor], decay: float = 0.9999, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        weight = 1.0 - self.current_decay()
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach().float(), weight)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


def init_from_checkpoint(model: LetsTalkTransformer, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load the tensors of a (Latte/DiT-style) checkpoint that match by name and shape.

    Accepts safetensors or a torch file (weights_only); a nested "ema"/"model"/"state_dict" entry is
    unwrapped. Returns {"loaded", "shape_mismatch", "unused", "missing"} key lists for the report.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    own = model.state_dict()
    loaded, mismatch = [], []
    for k, v in state.items():
        if k in own and tuple(own[k].shape) == tuple(v.shape):
            own[k] = v.to(own[k].dtype)
            loaded.append(k)
        elif k in own:
            mismatch.append(k)
    model.load_state_dict(own)
    return {"loaded": sorted(loaded), "shape_mismatch": sorted(mismatch),
            "unused": sorted(set(state) - set(own)), "missing": sorted(set(own) - set(loaded))}
