import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from letstalk.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion()


def diffusers_ddpm(steps: int | None = None) -> DDPMScheduler:
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear",
                          variance_type="learned_range", clip_sample=False, timestep_spacing="trailing")
    if steps:
        sched.set_timesteps(steps)
    return sched


def test_schedule_matches_diffusers_and_closed_form(diffusion):
    sched = diffusers_ddpm()
    np.testing.assert_allclose(diffusion.betas, sched.betas.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(diffusion.alphas_cumprod, sched.alphas_cumprod.double().numpy(), rtol=1e-5)
    assert diffusion.betas[0] == pytest.approx(1e-4) and diffusion.betas[-1] == pytest.approx(2e-2)
    # closed form: alpha_bar_t = prod_{s<=t} (1 - beta_s), beta linear
    t = 499
    betas = 1e-4 + (2e-2 - 1e-4) * np.arange(t + 1) / 999
    assert diffusion.alphas_cumprod[t] == pytest.approx(np.prod(1 - betas), rel=1e-12)
    assert diffusion.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # known DDPM value


def test_q_sample_matches_diffusers_add_noise(diffusion):
    x0, noise = torch.randn(4, 3, 4, 8, 8), torch.randn(4, 3, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ours = diffusion.q_sample(x0, t, noise)
    theirs = diffusers_ddpm().add_noise(x0, noise, t)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 17, 400, 999])
def test_learned_range_step_matches_diffusers_ddpm(diffusion, t):
    """Our p(x_{t-1}|x_t) (used by the VB loss) == diffusers' DDPMScheduler.step, same noise."""
    g = torch.Generator().manual_seed(t)
    xt = torch.randn(2, 4, 3, 8, 8, generator=g)  # channels first, as diffusers wants
    output = torch.cat([torch.randn(2, 4, 3, 8, 8, generator=g), torch.rand(2, 4, 3, 8, 8, generator=g) * 2 - 1], 1)
    sched = diffusers_ddpm(1000)
    step = sched.step(output, t, xt, generator=torch.Generator().manual_seed(7))
    z = torch.randn(output[:, :4].shape, generator=torch.Generator().manual_seed(7))
    tt = torch.full((2,), t)
    ours = diffusion.p_mean_variance(output.movedim(1, -3), xt.movedim(1, -3), tt)
    expected = (ours["mean"] + torch.exp(0.5 * ours["log_variance"]) * z.movedim(1, -3)).movedim(-3, 1)
    torch.testing.assert_close(step.prev_sample, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step.pred_original_sample, ours["pred_x0"].movedim(-3, 1), atol=1e-4, rtol=1e-4)


def test_respaced_learned_range_interpolates_the_respaced_bounds():
    """On a 250-step grid the variance spans [respaced posterior variance, respaced beta] (ADM respacing)."""
    sched = diffusers_ddpm(250)
    ac = sched.alphas_cumprod.double()
    t = int(sched.timesteps[100])
    t_prev = int(sched.timesteps[101])
    beta = 1 - ac[t] / ac[t_prev]
    post = (1 - ac[t_prev]) / (1 - ac[t]) * beta
    lo = sched._get_variance(t, predicted_variance=torch.tensor(-1.0)).double().exp()
    hi = sched._get_variance(t, predicted_variance=torch.tensor(1.0)).double().exp()
    assert lo.item() == pytest.approx(post.item(), rel=1e-4)
    assert hi.item() == pytest.approx(beta.item(), rel=1e-4)


def test_normal_kl_and_discretized_likelihood_closed_forms():
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    assert normal_kl(zero, zero, zero, zero).item() == 0
    assert normal_kl(zero, zero, one, zero).item() == pytest.approx(0.5)  # (mu1-mu2)^2 / 2
    # KL(N(0,1) || N(0,e)) = 0.5 * (log e - 1 + 1/e)
    assert normal_kl(zero, zero, zero, one).item() == pytest.approx(0.5 * (1 - 1 + math.exp(-1)))
    # the 256 bins of [-1, 1] carry (almost) all the probability mass
    bins = torch.linspace(-1, 1, 256)
    p = discretized_gaussian_log_likelihood(bins, torch.zeros(256), torch.full((256,), math.log(0.3))).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-3)


def oracle(diffusion: GaussianDiffusion, x0: torch.Tensor, v: float = -1.0):
    """The exact model for a point-mass data distribution at x0: ε from x_t, chosen variance."""
    def fn(xt, t):
        a = diffusion._at(diffusion.sqrt_alphas_cumprod, t, xt)
        s = diffusion._at(diffusion.sqrt_one_minus_alphas_cumprod, t, xt)
        eps = (xt - a * x0) / s
        return torch.cat([eps, torch.full_like(eps, v)], dim=-3)
    return fn


def test_training_loss_of_the_exact_model_is_zero(diffusion):
    x0 = torch.rand(4, 3, 4, 8, 8) * 2 - 1
    t = torch.tensor([1, 10, 300, 999])
    terms = diffusion.training_losses(oracle(diffusion, x0), x0, t)
    assert terms["mse"].max().item() < 1e-6
    assert terms["vb"].max().item() < 1e-4  # the true posterior: KL 0 (v=-1 is the posterior variance)
    # a wrong variance (v=+1: beta) costs exactly KL(N(m, post) || N(m, beta)) = 0.5 (log r - 1 + 1/r), r = beta/post
    vb = diffusion.training_losses(oracle(diffusion, x0, v=1.0), x0, t)["vb"]
    r = diffusion.betas[t.numpy()] / diffusion.posterior_variance[t.numpy()]
    expected = 0.5 * (np.log(r) - 1 + 1 / r) / math.log(2)
    np.testing.assert_allclose(vb.double().numpy(), expected, rtol=1e-3, atol=1e-7)
    assert vb[0] > 0.1


def test_vb_term_does_not_train_the_mean(diffusion):
    x0 = torch.randn(2, 3, 4, 8, 8)
    t = torch.tensor([5, 700])
    raw = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    terms = diffusion.training_losses(lambda xt, tt: raw, x0, t)
    (grad,) = torch.autograd.grad(terms["vb"].sum(), raw)
    assert grad[:, :, :4].abs().max() == 0 and grad[:, :, 4:].abs().max() > 0


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddpm", 250), ("ddpm", 20), ("ddim", 25),
                                           ("ddim", 10), ("dpm", 20), ("dpm", 10)])
def test_every_sampler_recovers_a_point_mass(diffusion, sampler, steps):
    x0 = torch.rand(1, 2, 4, 4, 4) * 2 - 1
    noise = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = []
    out = diffusion.sample(oracle(diffusion, x0), noise, sampler=sampler, steps=steps,
                           generator=torch.Generator().manual_seed(1), progress=lambda i, n: calls.append((i, n)))
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=0)
    assert calls[-1] == (steps, steps) and len(calls) == steps


def test_sampling_is_deterministic_given_a_seed(diffusion):
    noise = torch.randn(1, 2, 4, 4, 4)
    fn = lambda xt, t: torch.cat([0.1 * xt, torch.zeros_like(xt)], dim=-3)  # noqa: E731
    a = diffusion.sample(fn, noise, steps=10, generator=torch.Generator().manual_seed(3))
    b = diffusion.sample(fn, noise, steps=10, generator=torch.Generator().manual_seed(3))
    c = diffusion.sample(fn, noise, steps=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_sampler_settings(diffusion):
    with pytest.raises(ValueError, match="sampler must be one of"):
        diffusion.make_scheduler("euler", 10)
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        diffusion.make_scheduler("ddim", 0)
    with pytest.raises(ValueError, match="8 channels"):
        diffusion.training_losses(lambda xt, t: xt, torch.randn(1, 2, 4, 4, 4), torch.tensor([3]))


# ------------------------------------------------------------------ few-step distillation


def _toy_model(prediction: str):
    """A fixed nonlinear function of (x_t, t) standing in for a network: 2C output channels."""
    torch.manual_seed(5)
    w = torch.randn(3, 3) * 0.5

    def fn(x, t):
        h = torch.tanh(torch.einsum("ij,bj...->bi...", w, x)) + 0.001 * t.view(-1, 1, 1, 1).float()
        return torch.cat([h, torch.zeros_like(h)], dim=1)
    return fn


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_ddim_step_walks_the_same_path_as_the_ddim_sampler(prediction, clip):
    """Stepping a model with ddim_step over student_timesteps gives diffusers' DDIM sample (clipped
    x0 and ε re-derived, the last step to ᾱ = 1)."""
    diff = GaussianDiffusion(prediction=prediction)
    fn = _toy_model(prediction)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    want = diff.sample(fn, noise, sampler="ddim", steps=8, clip_range=clip)
    grid = diff.student_timesteps(8)
    assert grid[0] == 999 and grid[-1] == -1 and len(grid) == 9
    x = noise
    for t, s in zip(grid[:-1], grid[1:]):
        tt = torch.full((2,), t)
        pred, _ = diff.split_output(fn(x, tt), x)
        x = diff.ddim_step(diff.pred_x0(pred, x, tt), x, tt, torch.full((2,), s), clip)
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_distillation_target_lands_one_step_where_the_teacher_lands_in_several(prediction):
    """One DDIM step with the target x0 from x_t reaches the teacher's x_s after k steps; with
    s = -1 the target is the teacher's k-step sample itself (what a 2-step student of an 8-step
    teacher learns: the 8-step sample in two jumps)."""
    diff = GaussianDiffusion(prediction=prediction)
    fn = _toy_model(prediction)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    t, s = torch.tensor([999, 499]), torch.tensor([499, -1])
    target = diff.teacher_x0_target(fn, x, t, s, substeps=4)
    one_step = diff.ddim_step(target, x, t, s)
    # the teacher's own 4 steps, per sample, the long way round
    for i, (t0, s0) in enumerate(zip(t.tolist(), s.tolist())):
        xi = x[i:i + 1]
        for a, b in zip(np.linspace(t0, s0, 5)[:-1], np.linspace(t0, s0, 5)[1:]):
            ta, tb = torch.tensor([round(a)]), torch.tensor([round(b)])
            pred, _ = diff.split_output(fn(xi, ta), xi)
            xi = diff.ddim_step(diff.pred_x0(pred, xi, ta), xi, ta, tb)
        torch.testing.assert_close(one_step[i:i + 1], xi, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(target[1], one_step[1])  # s = -1: the target is the clean sample
    # and it is not trivially x_t's own one-step answer: the teacher's extra steps change it
    pred, _ = diff.split_output(fn(x, t), x)
    assert (target - diff.pred_x0(pred, x, t)).abs().max() > 1e-3
