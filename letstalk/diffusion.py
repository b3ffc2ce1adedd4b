"""Gaussian diffusion (ADM / DiT): training loss with learned-range variance, and samplers.

The network is an argument, never a member: `training_losses(model_fn, x0, t)` and
`sample(model_fn, noise)` take `model_fn(x_t, t) -> output`, where output has twice the
channels of x_t (ε, then the variance interpolation value v ∈ [-1, 1]) on axis -3, so both
(B, C, H, W) images and (B, F, C, H, W) clips work.

Sampling reuses diffusers' schedulers: DDPMScheduler handles learned-range variance (also on a
respaced grid) exactly like ADM's p_sample — tests/lib/test_diffusion.py proves it step by step
against `p_mean_variance` below — while DDIM and DPM-Solver++ use ε only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

Sampler = Literal["ddpm", "ddim", "dpm"]
# the sampler the CLI, the HTTP API, batch renders and evaluation use unless told otherwise: the demo
# model keeps its lip sync at DDIM-25 (docs/benchmarks.md) with a tenth of the denoising steps of the paper's
# 250-step DDPM, which stays one flag away (--sampler ddpm --steps 250)
DEFAULT_SAMPLER: Sampler = "ddim"
DEFAULT_STEPS = 25
# what the network's first C channels are: ε (ADM/DiT, the paper), or v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0
# (Salimans & Ho 2022), whose trivial high-noise answer is -x0 rather than the identity map x_t -> ε
Prediction = Literal["epsilon", "v_prediction", "sample"]
RESIDUAL_BASES: tuple[str, ...] = ("portrait", "motion")
PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
SAMPLERS: tuple[str, ...] = get_args(Sampler)  # the one list: CLI choices, API enums, config Literals
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClipTarget:
    """What the diffusion runs on: x0 = (clip - base) · scale, base = the portrait latent (residual)
    or 0. Training builds x0 with `encode`; samplers clip x0 to `sample_range` and `decode` turns
    a sample back into a clip.

    residual: with a portrait latent as base, x0 is ~0 except where the face moves (mouth, blinks,
        sway), so predicting 0 already renders the identity.
    scale: brings x0 to about unit variance. The residual of the demo data has an RMS of 0.07
        against unit noise: unscaled, x_t hides it at all but the smallest t and the network must
        predict v to ~1e-3 before its x0 beats 0 (measured: the audio went unused).
    """

    residual: bool = False
    scale: float = 1.0
    # the residual's base: the portrait latent, or the clip's last motion frame (the frame it
    # continues: "predict 0" then holds the previous frame, which a person-specific model with a
    # moving head needs; see docs/avatar.md). Clips without motion frames fall back to the portrait.
    base: str = "portrait"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"the target scale must be a positive number, got {self.scale}")
        if self.base not in RESIDUAL_BASES:
            raise ValueError(f"the residual base must be one of {RESIDUAL_BASES}, got {self.base!r}")

    def base_latent(self, portrait: torch.Tensor, motion: torch.Tensor | None) -> torch.Tensor:
        """(B, C, h, w): what the residual is taken from — the portrait, or the last motion frame."""
        if self.base == "motion" and motion is not None and motion.shape[1] > 0:
            return motion[:, -1]
        return portrait

    def encode(self, clip: torch.Tensor, portrait: torch.Tensor) -> torch.Tensor:
        """clip (B, F, C, h, w), base (B, C, h, w): the portrait or `base_latent` -> x0 (B, F, C, h, w)."""
        return (clip - portrait[:, None] if self.residual else clip) * self.scale

    def decode(self, x0: torch.Tensor, portrait: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode`."""
        clip = x0 / self.scale
        return clip + portrait[:, None] if self.residual else clip

    def sample_range(self, data_range: float | None) -> float | None:
        """x0's bound given the latents' bound ±data_range (None: unknown)."""
        if data_range is None:
            return None
        return data_range * self.scale * (2 if self.residual else 1)  # a difference of two values in ±r


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM's decoder NLL), nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


class GaussianDiffusion:
    """Linear betas beta_start..beta_end over num_timesteps steps; ε prediction; learned range σ.

    loss = MSE(ε) + VB, where the VB term (KL of the posterior to the model's Gaussian, in bits)
    sees a detached mean, so it trains only the variance (Improved DDPM's hybrid loss).
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 learn_sigma: bool = True, prediction: Prediction = "epsilon"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.num_timesteps, self.beta_start, self.beta_end = num_timesteps, beta_start, beta_end
        self.learn_sigma, self.prediction = learn_sigma, prediction
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1)
        self.posterior_variance = posterior_variance
        # the posterior variance is 0 at t=0: clip the log to the t=1 value (ADM)
        self.posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)

    @staticmethod
    def _at(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] shaped to broadcast against `like` (B, ...)."""
        out = torch.from_numpy(arr).to(like.device)[t.long()].float()
        return out.view(-1, *([1] * (like.ndim - 1)))

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean, variance, clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

    def split_output(self, output: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = xt.shape[-3]
        if self.learn_sigma:
            if output.shape[-3] != 2 * c:
                raise ValueError(f"model output must have {2 * c} channels on axis -3, got {tuple(output.shape)}")
            return output[..., :c, :, :], output[..., c:, :, :]
        return output, None

    def to_eps(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's prediction (self.prediction) -> ε. For v: ε = sqrt(ᾱ)·v + sqrt(1-ᾱ)·x_t; for
        x0 ("sample"): ε = (x_t - sqrt(ᾱ)·x0) / sqrt(1-ᾱ)."""
        if self.prediction == "epsilon":
            return pred
        if self.prediction == "sample":
            return (xt - self._at(self.sqrt_alphas_cumprod, t, xt) * pred) / self._at(
                self.sqrt_one_minus_alphas_cumprod, t, xt)
        return self._at(self.sqrt_alphas_cumprod, t, xt) * pred + self._at(self.sqrt_one_minus_alphas_cumprod, t, xt) * xt

    def p_mean_variance(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's Gaussian p(x_{t-1} | x_t) from its raw output."""
        pred, v = self.split_output(output, xt)
        eps = self.to_eps(pred, xt, t)
        if v is None:
            log_var = self._at(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        else:
            min_log = self._at(self.posterior_log_variance_clipped, t, xt)
            max_log = self._at(np.log(self.betas), t, xt)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        mean, _, _ = self.q_posterior(pred_x0, xt, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    # ------------------------------------------------------------------ training

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses: {"loss", "mse", "vb"} each of shape (B,).

        weight: optional per-element weights of the MSE, broadcastable to x0 (e.g. `motion_weights`).
        """
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        output = model_fn(xt, t)
        if output.shape[:-3] != xt.shape[:-3] or output.shape[-2:] != xt.shape[-2:]:
            raise ValueError(f"model output {tuple(output.shape)} does not match the input {tuple(xt.shape)}")
        pred, v = self.split_output(output.float(), xt)
        if self.prediction == "epsilon":
            target = noise
        elif self.prediction == "sample":
            target = x0
        else:  # v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0
            target = self._at(self.sqrt_alphas_cumprod, t, x0) * noise - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        err = (target - pred) ** 2
        terms = {"mse": mean_flat(err if weight is None else err * weight)}
        if v is None:
            terms["vb"] = torch.zeros_like(terms["mse"])
        else:
            # the VB term only trains the variance: the mean (through ε) is detached
            frozen = torch.cat([pred.detach(), v], dim=-3)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, xt, t)
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    def vb_terms_bpd(self, output, x0, xt, t) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim; decoder NLL at t=0. (B,)"""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(output, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------ few-step distillation

    def alpha_sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1-ᾱ_t)) shaped to broadcast against `like`; t = -1 is the clean end (ᾱ = 1,
        as DDIM's last step with set_alpha_to_one)."""
        t = torch.as_tensor(t, device=like.device).long().reshape(-1).expand(like.shape[0])
        bar = torch.from_numpy(np.append(self.alphas_cumprod, 1.0)).to(like.device)[t].float()  # index -1: 1.0
        bar = bar.view(-1, *([1] * (like.ndim - 1)))
        return bar.sqrt(), (1 - bar).clamp(min=0).sqrt()

    def pred_x0(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The clean sample the network's prediction (self.prediction, the first C channels) implies at x_t."""
        a, s = self.alpha_sigma(t, xt)
        if self.prediction == "sample":
            return pred
        if self.prediction == "v_prediction":
            return a * xt - s * pred
        return (xt - s * pred) / a

    def ddim_step(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int, s: torch.Tensor | int,
                  clip_range: float | None = None) -> torch.Tensor:
        """One deterministic DDIM (η = 0) step from x_t to x_s (s < t; s = -1: the clean end) given the
        predicted x0, clipped to ±clip_range with ε re-derived from the clipped x0 — the update
        `sample(sampler="ddim")` makes through diffusers (tests/lib/test_diffusion.py checks it)."""
        if clip_range is not None:
            x0 = x0.clamp(-clip_range, clip_range)
        a_t, s_t = self.alpha_sigma(t, xt)
        a_s, s_s = self.alpha_sigma(s, xt)
        eps = (xt - a_t * x0) / s_t
        return a_s * x0 + s_s * eps

    def student_timesteps(self, steps: int) -> list[int]:
        """The `steps`-step grid the DDIM sampler runs (make_scheduler's own), then -1 (clean)."""
        return [int(t) for t in self.make_scheduler("ddim", steps).timesteps] + [-1]

    @torch.no_grad()
    def teacher_x0_target(self, teacher_fn: ModelFn, xt: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                          substeps: int, clip_range: float | None = None) -> torch.Tensor:
        """Progressive-distillation target (Salimans & Ho 2022), generalised to `substeps` teacher
        steps: the teacher runs `substeps` DDIM steps from x_t to x_s (evenly spaced timesteps, per
        sample); the target is the x0 with which ONE DDIM step from x_t lands exactly on the
        teacher's x_s. At s = -1 (the clean end) that is the teacher's own sample. (B,) t and s."""
        if substeps < 1:
            raise ValueError(f"substeps must be >= 1, got {substeps}")
        x = xt
        path = torch.stack([torch.round(t.double() + (s.double() - t.double()) * i / substeps).long()
                            for i in range(substeps + 1)])  # (substeps + 1, B)
        for i in range(substeps):
            out = teacher_fn(x, path[i]).float()
            pred, _ = self.split_output(out, x)
            x = self.ddim_step(self.pred_x0(pred, x, path[i]), x, path[i], path[i + 1], clip_range)
        a_t, s_t = self.alpha_sigma(t, xt)
        a_s, s_s = self.alpha_sigma(s, xt)
        ratio = s_s / s_t
        return (x - ratio * xt) / (a_s - ratio * a_t)

    # ------------------------------------------------------------------ sampling

    def scheduler_config(self) -> dict:
        return {"num_train_timesteps": self.num_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": "linear", "prediction_type": self.prediction}

    def make_scheduler(self, sampler: Sampler, steps: int, clip_range: float | None = None):
        """A diffusers scheduler with `steps` timesteps, spaced "trailing" so the first is T-1.

        clip_range: clip the predicted x0 to [-clip_range, clip_range] at every step (data with a
        known range, e.g. pixels); DDPM and DDIM then recompute ε from the clipped x0. DPM-Solver
        ignores it.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_timesteps}, got {steps}")
        base = self.scheduler_config() | {"timestep_spacing": "trailing"}
        if clip_range is not None and not clip_range > 0:
            raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")
        clip = ({"clip_sample": False} if clip_range is None
                else {"clip_sample": True, "clip_sample_range": float(clip_range)})
        if sampler == "ddpm":
            variance = "learned_range" if self.learn_sigma else "fixed_small"
            sched = DDPMScheduler(**base, variance_type=variance, **clip)
        elif sampler == "ddim":
            sched = DDIMScheduler(**base, set_alpha_to_one=True, **clip)
        else:
            # ε only: diffusers' DPM-Solver learned-variance path slices output[:, :3] (RGB-pixel
            # assumption), which is wrong for 4-channel latents.
            sched = DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2,
                                                lower_order_final=True, final_sigmas_type="zero")
        sched.set_timesteps(steps)
        return sched

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise: torch.Tensor, *, sampler: Sampler = "ddpm", steps: int = 250,
               generator: torch.Generator | None = None, clip_range: float | None = None,
               x_init: torch.Tensor | None = None, strength: float = 1.0,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Denoise `noise` (B, ..., C, H, W) from t = T-1 to a clean sample of the same shape.

        sampler "ddpm" with steps=250 is the paper's setting (respaced ancestral sampling with the
        learned variance); "ddim" (η=0) and "dpm" (DPM-Solver++ 2M) are the fast ones.
        clip_range: clip the predicted x0 to ±clip_range at every step (see make_scheduler).
        x_init, strength: start from x_init (same shape as noise, e.g. the reference frame repeated)
            noised to t = strength·T instead of from pure noise, and run only the steps of the
            `steps`-step grid at or below that t (SDEdit / diffusers img2img). strength 1 (default)
            is sampling from noise.
        """
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        sched = self.make_scheduler(sampler, steps, clip_range)
        c = noise.shape[-3]
        timesteps = sched.timesteps
        if x_init is None or strength == 1.0:
            x = noise * sched.init_noise_sigma
        else:
            start = min(self.num_timesteps - 1, int(round(strength * self.num_timesteps)))
            timesteps = timesteps[timesteps <= start]
            if len(timesteps) == 0:
                raise ValueError(f"strength {strength} leaves none of the {steps} steps")
            t0 = torch.full((x_init.shape[0],), int(timesteps[0]), device=x_init.device, dtype=torch.long)
            x = self.q_sample(x_init.to(noise.dtype), t0, noise)
            if sampler == "dpm":
                raise ValueError("strength < 1 needs the ddpm or ddim sampler")
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            out = model_fn(x, tt).float()
            # diffusers wants channels on axis 1: (B, F, C, H, W) -> (B, C, F, H, W)
            xs, outs = x.movedim(-3, 1), out.movedim(-3, 1)
            if sampler != "ddpm" or not self.learn_sigma:
                outs = outs[:, :c]
            kwargs = {"generator": generator} if sampler == "ddpm" else {}
            if sampler == "ddim":
                # ε re-derived from the clipped x0 (as in GLIDE); diffusers' default keeps the raw ε,
                # which walks the next x_t off the data range whenever the clip was active
                kwargs["use_clipped_model_output"] = True
            x = sched.step(outs, t, xs, **kwargs).prev_sample.movedim(1, -3)
            if progress is not None:
                progress(i + 1, total)
        return x
