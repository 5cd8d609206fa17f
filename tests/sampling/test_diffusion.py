"""The diffusion head's sampling loop against a closed form: a 1-D Gaussian target, for which the ideal noise (or v)
prediction and reverse variance are known, must be sampled with its mean and variance."""

import math

import pytest
import torch

from argen.diffusion import DiffusionSchedule
from argen.sampling.diffusion import per_sample_noise, sample_head

MU, SIGMA = 1.5, 0.5


def ideal_head(schedule: DiffusionSchedule):
    """For x_0 ~ N(MU, SIGMA^2): E[eps | x_t] (or E[v | x_t] = E[eps | x_t] / a - s / a x_t for a v-predicting
    schedule) and the variance value in [-1, 1] giving the exact reverse variance
    Var[x_{t-1} | x_t] = posterior variance + coef1^2 Var[x_0 | x_t], for the (respaced) `schedule`."""
    index = torch.zeros(int(schedule.timestep_map.max()) + 1, dtype=torch.long)
    index[schedule.timestep_map] = torch.arange(len(schedule.timestep_map))

    def head(x, t, z):
        i = index[t]
        ab = schedule.alphas_cumprod[i][:, None]
        total = ab * SIGMA**2 + 1 - ab
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * MU) / total
        var_x0 = SIGMA**2 * (1 - ab) / total
        exact = schedule.posterior_variance[i][:, None] + schedule.posterior_mean_coef1[i][:, None] ** 2 * var_x0
        low, high = schedule.posterior_log_variance_clipped[i][:, None], schedule.log_betas[i][:, None]
        frac = ((exact.log() - low) / (high - low)).clamp(0, 1)
        frac = torch.where(high > low, frac, torch.zeros_like(frac))
        if schedule.prediction == "v":
            eps = (eps - (1 - ab).sqrt() * x.double()) / ab.sqrt()
        return torch.cat([eps, 2 * frac - 1], dim=1).float()

    return head


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1000, 50])
def test_samples_a_gaussian_with_its_mean_and_variance(steps, prediction):
    schedule = DiffusionSchedule.cosine(1000, prediction).respaced(steps)
    assert schedule.prediction == prediction
    n = 20000
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    owners = torch.arange(n) % 4
    noise = per_sample_noise(generators, owners, 1, torch.device("cpu"))
    x = sample_head(ideal_head(schedule), torch.zeros(n, 1), schedule, noise)
    # standard errors: mean SIGMA / sqrt(n) = 0.0035, std SIGMA / sqrt(2n) = 0.0025
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(SIGMA, abs=0.015)


def test_temperature_scales_the_noise():
    schedule = DiffusionSchedule.cosine(1000).respaced(50)
    n = 20000
    noise = per_sample_noise(
        [torch.Generator().manual_seed(0)], torch.zeros(n, dtype=torch.long), 1, torch.device("cpu")
    )
    cold = sample_head(ideal_head(schedule), torch.zeros(n, 1), schedule, noise, temperature=0.5)
    assert cold.mean().item() == pytest.approx(MU, abs=0.02)
    assert cold.std().item() < 0.8 * SIGMA  # a cooler chain concentrates around the mode


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_target_stands_for_the_clean_value_it_was_made_from(prediction):
    """target() and predict_xstart() are inverse: the exact target at x_t recovers x_0 at every timestep, and a v
    target is a eps - s x_0."""
    schedule = DiffusionSchedule.cosine(1000, prediction)
    x0, noise = torch.randn(1000, 4), torch.randn(1000, 4)
    t = torch.arange(1000)
    target = schedule.target(x0, t, noise)
    x_t = schedule.q_sample(x0, t, noise)
    # eps recovers x_0 through 1 / a, up to ~300 at t = 999: float32 rounding of x_t grows with it there
    tol = 1e-4 if prediction == "v" else 2e-2
    assert torch.allclose(schedule.predict_xstart(target, x_t, t), x0, atol=tol)
    a, s = schedule.take(schedule.sqrt_alphas_cumprod, t), schedule.take(schedule.sqrt_one_minus_alphas_cumprod, t)
    assert torch.allclose(target, noise if prediction == "eps" else a * noise - s * x0)


def test_an_error_in_v_is_never_amplified_in_x0_but_one_in_eps_is():
    """Why a head might predict v: at the noisiest step the same small error costs eps ~ s / a times more in x_0."""
    t = torch.tensor([999])
    x_t, error = torch.zeros(1, 1), torch.full((1, 1), 0.01)
    errs = {
        p: (s.predict_xstart(error, x_t, t) - s.predict_xstart(torch.zeros(1, 1), x_t, t)).abs().item()
        for p, s in ((p, DiffusionSchedule.cosine(1000, p)) for p in ("eps", "v"))
    }
    assert errs["v"] <= 0.01 and errs["eps"] > 100 * 0.01


def test_an_unknown_prediction_is_refused_by_name():
    with pytest.raises(ValueError, match="prediction must be one of"):
        DiffusionSchedule.cosine(1000, "x0")


def test_spaced_timesteps_match_iddpm():
    """IDDPM's space_timesteps(1000, "8"): round(i * 999 / 7)."""
    assert DiffusionSchedule.cosine(1000).respaced(8).timestep_map.tolist() == [round(i * 999 / 7) for i in range(8)]
    assert not math.isnan(float(DiffusionSchedule.cosine(1000).posterior_log_variance_clipped[0]))


def test_clip_clamps_the_x0_prediction_and_zero_leaves_it():
    """With clip > 0 the mean is the posterior mean of the clamped x0; clip 0 is the unclipped (official) mean."""
    from argen.diffusion import DiffusionSchedule

    s = DiffusionSchedule.cosine(1000).respaced(50)
    x = torch.full((3, 2), 0.5)
    t = torch.full((3,), 49)  # the first sampling step: x0 = x / sqrt(abar) - ... is huge for any eps error
    out = torch.cat([torch.full((3, 2), -0.3), torch.zeros(3, 2)], dim=1)
    free, _ = s.p_mean_variance(out, x, t)
    clipped, log_var = s.p_mean_variance(out, x, t, clip=4.0)
    x0 = s.take(s.sqrt_recip_alphas_cumprod, t) * x - s.take(s.sqrt_recipm1_alphas_cumprod, t) * out[:, :2]
    assert x0.abs().min() > 4.0  # the case clipping is for
    want, _ = s.q_posterior(x0.clamp(-4.0, 4.0), x, t)
    torch.testing.assert_close(clipped, want)
    assert not torch.allclose(free, clipped)
    torch.testing.assert_close(s.p_mean_variance(out, x, t, clip=0.0)[0], free)


def test_autoguidance_contrasts_the_noise_predictions_of_two_heads_on_the_same_chain():
    """A guide head adds (g - 1) (cond - guide) to the noise prediction at every step, with the generator's
    variance: the same chain as one head predicting that sum. g = 1 leaves the chain bit for bit, CFG included."""
    schedule = DiffusionSchedule.cosine(1000).respaced(20)
    n, g = 64, torch.full((64,), 2.5)
    z, z_null, z_guide = (torch.randn(n, 1, generator=torch.Generator().manual_seed(s)) for s in range(3))

    def head(x, t, z):  # variance values unlike the guide's: the chain must keep the generator's
        return torch.cat([0.5 * x + z, 0.3 + 0 * x], dim=1)

    def guide(x, t, z):
        return torch.cat([0.2 * x - z, -0.9 + 0 * x], dim=1)

    def noise():
        return per_sample_noise([torch.Generator().manual_seed(7)], torch.zeros(n, dtype=torch.long), 1, "cpu")

    def combined(x, t, zz):
        eps, var = head(x, t, zz).split(1, dim=1)
        return torch.cat([eps + (g[:, None] - 1) * (eps - guide(x, t, z_guide)[:, :1]), var], dim=1)

    auto = sample_head(head, z, schedule, noise(), guide_head=guide, z_guide=z_guide, guide_scale=g)
    assert torch.allclose(auto, sample_head(combined, z, schedule, noise()), atol=1e-5)
    plain = sample_head(head, z, schedule, noise())
    assert not torch.allclose(auto, plain, atol=1e-2)
    ones = torch.ones(n)
    assert torch.equal(
        sample_head(head, z, schedule, noise(), guide_head=guide, z_guide=z_guide, guide_scale=ones), plain
    )
    cfg = sample_head(head, z, schedule, noise(), cfg_scale=2.0, z_null=z_null)
    both = sample_head(
        head, z, schedule, noise(), 1.0, 2.0, z_null, guide_head=guide, z_guide=z_guide, guide_scale=ones
    )
    assert torch.equal(both, cfg) and not torch.equal(cfg, plain)


def test_row_groups_of_different_step_counts_share_one_loop():
    """Rows with their own respaced processes (a server's MAR requests at different AR steps under DiSA) run in one
    loop whose calls serve every running row: each group's values are the ones its own loop gives, and the head is
    called as many times as the longest process has steps, not their sum."""
    from argen.sampling.diffusion import RowGroup

    full = DiffusionSchedule.cosine(1000)
    z = torch.randn(6, 1, generator=torch.Generator().manual_seed(0))
    z_null, scales = torch.zeros(6, 1), torch.tensor([2.0, 2.0, 1.0, 1.5, 3.0, 3.0])
    calls = []

    def head(x, t, z):
        calls.append(len(x))
        return torch.cat([0.5 * x + z * t[:, None] / 1000, 0.3 + 0 * x], dim=1)

    def noise(owners):
        gens = [torch.Generator().manual_seed(s) for s in range(3)]
        return per_sample_noise(gens, owners, 1, "cpu")

    owners = torch.tensor([0, 0, 1, 1, 2, 2])  # sample 1 (rows 2, 3) runs 4 steps, samples 0 and 2 run 10
    alone = [
        sample_head(head, z[r], full.respaced(k), noise(owners[r]), 0.9, scales[r], z_null[r])
        for r, k in ((torch.tensor([0, 1, 4, 5]), 10), (torch.tensor([2, 3]), 4))
    ]
    calls.clear()
    groups = [
        RowGroup(full.respaced(10), torch.tensor([0, 1, 4, 5]), noise(owners[[0, 1, 4, 5]])),
        RowGroup(full.respaced(4), torch.tensor([2, 3]), noise(owners[[2, 3]])),
    ]
    together = sample_head(head, z, groups, None, 0.9, scales, z_null)
    assert torch.equal(together[[0, 1, 4, 5]], alone[0]) and torch.equal(together[[2, 3]], alone[1])
    # the 4-step rows join for the last 4 calls; CFG doubles every guided row, and row 2 (scale 1) is not guided
    assert len(calls) == 10 and calls == [8] * 6 + [11] * 4


def test_guidance_acts_only_inside_its_noise_interval():
    """With an interval, a step is guided where its noise level t / T lies in it and runs the conditional head alone
    elsewhere (no unconditional pass): the same chain as one head that guides itself at those levels only. The
    whole range [0, 1] is plain guidance, bit for bit."""
    schedule = DiffusionSchedule.cosine(1000).respaced(20)
    n, scale, low, high = 32, 2.5, 0.3, 0.8
    z, z_null = (torch.randn(n, 1, generator=torch.Generator().manual_seed(s)) for s in range(2))
    calls = []

    def head(x, t, zz):
        calls.append(len(x))
        return torch.cat([0.5 * x + zz * (1 + t[:, None] / 1000), 0.3 + 0 * x], dim=1)

    def self_guided(x, t, zz):
        cond, uncond = head(x, t, z), head(x, t, z_null)
        inside = ((t >= low * 1000) & (t <= high * 1000))[:, None]
        eps = torch.where(inside, uncond[:, :1] + scale * (cond[:, :1] - uncond[:, :1]), cond[:, :1])
        return torch.cat([eps, cond[:, 1:]], dim=1)

    def noise():
        return per_sample_noise([torch.Generator().manual_seed(3)], torch.zeros(n, dtype=torch.long), 1, "cpu")

    calls.clear()
    limited = sample_head(head, z, schedule, noise(), 1.0, scale, z_null, interval=(low, high))
    guided_steps = sum(1 for t in schedule.timestep_map.tolist() if low <= t / 1000 <= high)
    assert 0 < guided_steps < 20 and sorted(calls) == [n] * (20 - guided_steps) + [2 * n] * guided_steps
    assert torch.allclose(limited, sample_head(self_guided, z, schedule, noise()), atol=1e-5)
    everywhere = sample_head(head, z, schedule, noise(), 1.0, scale, z_null)
    assert torch.equal(sample_head(head, z, schedule, noise(), 1.0, scale, z_null, interval=(0.0, 1.0)), everywhere)
    assert not torch.allclose(limited, everywhere, atol=1e-3)
