"""Analytic tests of diff2flow.py.

For Gaussian data N(mu, diag(std²)) every optimal predictor has a closed form, so the Bayes-optimal
diffusion model ("oracle") can be written down and converted, and the result compared against the
closed-form optimal FM velocity. Everything runs in float64 on (N, D) "latents"; no network needed.

  diffusion, x_t = a x_0 + s eps:  x̂_0 = mu + a std² / (a² std² + s²) (x_t - a mu),
                                   ε̂ = (x_t - a x̂_0) / s,  v̂ = a ε̂ - s x̂_0
  FM, x_t = t x_1 + (1-t) x_0:     x̂_1 = mu + t std² / var_t (x_t - t mu),  var_t = t² std² + (1-t)²
                                   x̂_0 = (1-t) / var_t (x_t - t mu),  v* = x̂_1 - x̂_0
"""
import pytest
import torch
import torch.nn as nn

import diff2flow as d
import sd

T = 1000
SD = sd.sd_alphas_cumprod()
ZT = d.rescale_zero_terminal_snr(SD)
SCHEDULES = {"sd": SD, "ztsnr": ZT}
D = 12
MU = torch.linspace(-1.5, 2.0, D, dtype=torch.float64)
STD = torch.linspace(0.4, 1.6, D, dtype=torch.float64)  # below and above 1: the ends bias both ways
ALL = [(name, pred) for name in SCHEDULES for pred in ("eps", "v")]


pytestmark = pytest.mark.usefixtures("one_thread")


def oracle(alphas_cumprod, prediction, mu=MU, std=STD):
    """The Bayes-optimal eps- or v-model for N(mu, diag(std²)) data, a "unet"(x, t_dm, context)."""
    def unet(x, t_dm, context=None):
        a, s = (c.reshape(-1, 1) for c in d.alpha_sigma(t_dm, alphas_cumprod))
        x0 = mu + a * std**2 / (a**2 * std**2 + s**2) * (x - a * mu)
        eps = (x - a * x0) / s
        return eps if prediction == "eps" else a * eps - s * x0
    return unet


def optimal_fm_velocity(x, t, mu=MU, std=STD):
    t = t.reshape(-1, 1)
    var = t**2 * std**2 + (1 - t) ** 2
    return mu + t * std**2 / var * (x - t * mu) - (1 - t) / var * (x - t * mu)


def whitened_noise(n=4096, seed=0):
    """N(0, I) noise with sample mean exactly 0 and std exactly 1 per dimension. The optimal flow of
    Gaussian data is affine per dimension (so are all our samplers applied to it), hence the sample
    mean/std of the output are exactly the map's offset/slope: no Monte Carlo error is left (raw
    noise would add ~std/sqrt(n) = 0.025 for n = 4096, far above the effects measured here)."""
    e = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (e - e.mean(0)) / e.std(0)


def end_bias(t_lo, t_hi, std=STD):
    """First-order relative std bias of FM sampling caused by FlowModel's end rule: integrating the
    clamped model's gain error over [0, t_lo] gives +t_lo² std²/2, over [t_hi, 1] -(1-t_hi)²/(2 std²)."""
    return t_lo**2 * std**2 / 2 - (1 - t_hi) ** 2 / (2 * std**2)


# ----------------------------------------------------------------------------- schedule and maps


def test_schedules_match_diffusers():
    sched = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    ref = sched.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(SD.float(), ref.alphas_cumprod, rtol=0, atol=1e-6), "SD schedule, atol 1e-6"
    betas = 1 - SD / torch.cat([torch.ones(1, dtype=torch.float64), SD[:-1]])  # float64, unlike ref.betas
    zt_ref = torch.cumprod(1 - sched.rescale_zero_terminal_snr(betas), 0)
    assert torch.allclose(ZT, zt_ref, rtol=0, atol=1e-12), "zero terminal SNR, atol 1e-12"
    assert ZT[-1] == 0 and ZT[0] == SD[0]
    trailing = sched.DDIMScheduler(timestep_spacing="trailing")
    for steps in (10, 30, 50):
        trailing.set_timesteps(steps)
        assert d.ddim_timesteps(steps, T).long().tolist() == trailing.timesteps.tolist()


def test_fm_time_ranges():
    t_lo, t_hi = d.fm_time_range(SD, "eps")
    assert abs(t_lo - 0.0640425) < 1e-6 and abs(t_hi - 0.9716595) < 1e-6, (t_lo, t_hi)
    assert d.fm_time_range(SD, "v") == (t_lo, t_hi)
    assert d.fm_time_range(ZT, "v") == (0.0, t_hi)
    assert d.max_dm_time(ZT, "eps") == T - 2 and 0 < d.fm_time_range(ZT, "eps")[0] < 1e-3


@pytest.mark.parametrize("name", SCHEDULES)
def test_time_maps_monotone_and_exact_inverses(name):
    ac = SCHEDULES[name]
    t_dm = torch.linspace(0, T - 1, 7993, dtype=torch.float64)  # mostly fractional
    t_fm = d.dm_to_fm_time(t_dm, ac)
    assert (t_fm.diff() < 0).all(), "f_t strictly decreasing"
    assert (d.fm_to_dm_time(t_fm, ac) - t_dm).abs().max() < 1e-6, "dm -> fm -> dm, 1e-6"
    t_lo, t_hi = d.fm_time_range(ac, "v")
    r = torch.linspace(t_lo, t_hi, 4097, dtype=torch.float64)
    back = d.dm_to_fm_time(d.fm_to_dm_time(r, ac), ac)
    assert (back - r).abs().max() < 1e-6, "fm -> dm -> fm, 1e-6"
    assert (d.fm_to_dm_time(r, ac).diff() < 0).all()
    assert d.fm_to_dm_time(r.float(), ac).dtype == torch.float32, "answers in the input's dtype"
    ends = d.fm_to_dm_time(torch.tensor([0.0, t_lo / 2, 1 - (1 - t_hi) / 2, 1.0], dtype=torch.float64), ac)
    assert ends.tolist() == [T - 1, T - 1, 0, 0], "outside [t_lo, t_hi] t_DM clamps to the end timestep"


@pytest.mark.parametrize("name", SCHEDULES)
def test_aligned_interpolant_identity(name):
    """(alpha + sigma) (t x_1 + (1-t) eps) = alpha x_1 + sigma eps at t = f_t(t_DM)."""
    ac, g = SCHEDULES[name], torch.Generator().manual_seed(1)
    t_dm = torch.rand(64, generator=g, dtype=torch.float64) * (T - 1)
    x1, eps = torch.randn(2, 64, D, generator=g, dtype=torch.float64)
    a, s = (c.reshape(-1, 1) for c in d.alpha_sigma(t_dm, ac))
    t = d.dm_to_fm_time(t_dm, ac).reshape(-1, 1)
    x_dm = d.fm_to_dm_scale(t) * (t * x1 + (1 - t) * eps)
    assert torch.allclose(x_dm, a * x1 + s * eps, rtol=0, atol=1e-13), "float64 precision"
    assert torch.allclose(d.fm_to_dm_scale(t), a + s, rtol=0, atol=1e-14)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_velocity_from_prediction_is_data_minus_noise(prediction):
    """v = x̂_1 - x̂_0 = x̂_0^DM - ε̂: the exact eps or v target gives back data minus noise, from
    split_prediction and through FlowModel (which takes that difference inside [t_lo, t_hi])."""
    g = torch.Generator().manual_seed(2)
    t_dm = torch.rand(32, generator=g, dtype=torch.float64) * (T - 1)
    x0, eps = torch.randn(2, 32, D, generator=g, dtype=torch.float64)
    a, s = (c.reshape(-1, 1) for c in d.alpha_sigma(t_dm, SD))
    pred = eps if prediction == "eps" else a * eps - s * x0
    data, noise = d.split_prediction(pred, a * x0 + s * eps, a.flatten(), s.flatten(), prediction)
    assert torch.allclose(data - noise, x0 - eps, rtol=0, atol=1e-12)

    def target(x, t, context=None):  # the exact prediction for these (x0, eps) at the UNet's input
        a, s = (c.reshape(-1, 1) for c in d.alpha_sigma(t, SD))
        e = (x - a * x0) / s
        return e if prediction == "eps" else a * e - s * x0
    t_fm = d.dm_to_fm_time(t_dm, SD)
    x_fm = t_fm.reshape(-1, 1) * x0 + (1 - t_fm.reshape(-1, 1)) * eps
    v = d.FlowModel(target, SD, prediction)(x_fm, t_fm)
    assert torch.allclose(v, x0 - eps, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- the converted oracle


@pytest.mark.parametrize("name,prediction", ALL)
def test_converted_oracle_is_the_optimal_fm_velocity(name, prediction):
    ac = SCHEDULES[name]
    flow = d.FlowModel(oracle(ac, prediction), ac, prediction)
    g = torch.Generator().manual_seed(3)
    t = torch.cat([torch.linspace(flow.t_lo, flow.t_hi, 1001, dtype=torch.float64),
                   d.dm_to_fm_time(torch.arange(T, dtype=torch.float64), ac)])  # and every UNet timestep
    t = t[t >= flow.t_lo]  # an eps-model with zero terminal SNR starts at T-2
    x = MU * t.reshape(-1, 1) + 2 * torch.randn(len(t), D, generator=g, dtype=torch.float64)
    err = (flow(x, t) - optimal_fm_velocity(x, t)).abs().max().item()
    print(f"{name}/{prediction}: max |v - v*| = {err:.2e}")
    assert err < 1e-5, f"converted oracle vs closed-form optimal FM velocity: {err:.2e} (tol 1e-5)"


@pytest.mark.parametrize("name,prediction", ALL)
def test_ends_follow_the_documented_rule(name, prediction):
    """At t = 0 and 1 (scale 1, x_DM = x_FM): v = x̂_1(T_max) - x_t and v = x_t - ε̂(0), both finite;
    v is continuous across t_lo and t_hi."""
    ac = SCHEDULES[name]
    flow = d.FlowModel(oracle(ac, prediction), ac, prediction)
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a, s = d.alpha_sigma(torch.tensor(float(flow.t_dm_max)), ac)
    x1_hat = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * MU)
    assert torch.allclose(flow(x, 0.0), x1_hat - x, rtol=0, atol=1e-12)
    a, s = d.alpha_sigma(torch.tensor(0.0), ac)
    eps_hat = (x - a * (MU + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * MU))) / s
    assert torch.allclose(flow(x, 1.0), x - eps_hat, rtol=0, atol=1e-12)
    for t_end in (flow.t_lo, flow.t_hi):
        if 0 < t_end < 1:
            jump = (flow(x, t_end - 1e-9) - flow(x, t_end + 1e-9)).abs().max()
            assert jump < 1e-6, f"v continuous at {t_end}: jump {jump:.1e}"


@pytest.mark.parametrize("name,prediction", ALL)
def test_no_nan_anywhere_values_and_gradients(name, prediction):
    ac = SCHEDULES[name]
    w = torch.ones((), dtype=torch.float64, requires_grad=True)  # a "parameter" of the network
    net = oracle(ac, prediction)
    flow = d.FlowModel(lambda x, t, c: w * net(x, t, c), ac, prediction)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)  # includes 0 and 1 exactly
    x = torch.randn(len(t), D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = flow(x, t)
    v.square().mean().backward()
    assert torch.isfinite(v).all() and torch.isfinite(w.grad)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.isfinite(d.fm_to_dm_time(ends, ac)).all()
    assert torch.isfinite(d.dm_to_fm_time(ends * (T - 1), ac)).all()


# ------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name,prediction", ALL)
@pytest.mark.parametrize("sampler,steps,shift,tol",
                         [(d.sample_heun, 40, 1.0, 1.5e-3), (d.sample_heun, 40, 3.0, 5e-3),
                          (d.sample_euler, 1000, 1.0, 4e-3)], ids=["heun40", "heun40-shift3", "euler1000"])
def test_fm_sampling_recovers_the_gaussian(name, prediction, sampler, steps, shift, tol):
    """From pure noise at t = 0 to t = 1. Left: the end rule's bias (end_bias, up to 0.5% here, checked
    to its first-order formula) and discretization (Heun 2nd order: < 1e-3 at 40 steps, 3.7e-3 with
    shift 3, which leaves fewer steps for the curved data end; Euler 1st order: ~1.6/steps).
    Whitened noise removes the Monte Carlo error (see whitened_noise)."""
    ac = SCHEDULES[name]
    flow = d.FlowModel(oracle(ac, prediction), ac, prediction)
    x = sampler(flow, whitened_noise(), steps, shift=shift)
    assert torch.isfinite(x).all()
    mean_err = (x.mean(0) - MU).abs().max().item()
    rel_std = x.std(0) / STD - 1
    assert mean_err < 3e-3, f"mean error {mean_err:.1e} (tol 3e-3)"
    assert rel_std.abs().max() < 1e-2, "std recovered to 1%"
    resid = (rel_std - end_bias(flow.t_lo, flow.t_hi)).abs().max().item()
    assert resid < tol, f"std beyond the documented end bias: {resid:.1e} (tol {tol:.0e})"


def test_start_at_t0_vs_start_at_t_lo():
    """Documented: samplers start at t = 0 from pure noise, where the interpolant IS the noise. Starting
    at t_lo = f_t(T-1) instead with the properly scaled noise (1 - t_lo) x_0 drops the signal part
    t_lo x_1 of x_{t_lo}: the mean comes out biased by -t_lo std mu / sd_lo, as derived from the exact
    affine flow x_1 = mu + std / sd_lo (x_{t_lo} - t_lo mu), sd_lo² = t_lo² std² + (1 - t_lo)²."""
    flow = d.FlowModel(oracle(SD, "v"), SD, "v")
    noise, t_lo, steps = whitened_noise(), flow.t_lo, 40
    from_zero = d.sample_heun(flow, noise, steps)
    x, ts = (1 - t_lo) * noise, torch.linspace(t_lo, 1, steps + 1, dtype=torch.float64)
    for t0, t1 in zip(ts[:-1], ts[1:]):  # the same Heun steps, on [t_lo, 1]
        v0 = flow(x, t0)
        x = x + (t1 - t0) * (v0 + flow(x + (t1 - t0) * v0, t1)) / 2
    sd_lo = (t_lo**2 * STD**2 + (1 - t_lo) ** 2).sqrt()
    assert (from_zero.mean(0) - MU).abs().max() < 3e-3
    assert (x.mean(0) - (MU - t_lo * STD * MU / sd_lo)).abs().max() < 2e-3, "predicted leak"
    assert (x.mean(0) - MU).abs().max() > 0.2, "and it is large: 0.22 for mu = 2, std = 1.6"
    expected_std = STD * (1 - t_lo) / sd_lo * (1 + end_bias(0.0, flow.t_hi))
    assert ((x.std(0) - expected_std) / STD).abs().max() < 1.5e-3


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_matches_diffusers(prediction):
    sched = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    ref = sched.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                              prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])
    net, noise = oracle(SD, prediction), whitened_noise(256)
    ref.set_timesteps(25)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(net(x, t.double()), t, x).prev_sample
    ours = d.sample_ddim(d.FlowModel(net, SD, prediction), noise, 25)
    assert torch.allclose(ours, x, rtol=0, atol=1e-5), "diffusers keeps abar in float32: atol 1e-5"


@pytest.mark.parametrize("name,prediction", ALL)
def test_ddim_on_the_raw_oracle(name, prediction):
    """DDIM starts from x = noise at T_max: exact with zero terminal SNR; with the SD schedule the
    true x_{T-1} = a x_0 + s eps still holds a = 0.068 of signal, so the result follows the exact
    affine PF-ODE map from N(0, 1) at T-1: mean mu - std a mu / sd_T, std std / sd_T. DDIM is first
    order (measured relative std error ~5/steps): tol 3% at 250 steps."""
    ac = SCHEDULES[name]
    flow = d.FlowModel(oracle(ac, prediction), ac, prediction)
    x = d.sample_ddim(flow, whitened_noise(), 250)
    a, s = d.alpha_sigma(torch.tensor(float(flow.t_dm_max)), ac)
    sd_T = (a**2 * STD**2 + s**2).sqrt()
    assert (x.mean(0) - (MU - STD * a * MU / sd_T)).abs().max() < 2e-3
    assert ((x.std(0) - STD / sd_T) / STD).abs().max() < 3e-2
    if name == "ztsnr":
        assert (x.mean(0) - MU).abs().max() < 2e-3


@pytest.mark.parametrize("sampler", [d.sample_euler, d.sample_heun])
def test_fm_sampler_callback_sees_every_step_and_its_states_rebuild_the_result(sampler):
    """callback({"i", "x", "t", "t_next", "v"}) once per step, before the update: v is the guided velocity at
    (x, t) (Heun: the average of its two), and x_{i+1} = x_i + (t_next - t) v_i rebuilds the sampler's path and
    result exactly. Watching changes nothing."""
    model, g = toy_model([]), torch.Generator().manual_seed(8)
    noise = torch.randn(4, D, generator=g, dtype=torch.float64)
    cond = torch.randn(4, 3, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 3, generator=g, dtype=torch.float64)
    guided = lambda x, t: d.cfg_velocity(model, x, t, cond, uncond, 3.0)
    seen = []
    out = sampler(model, noise, 5, cond, uncond, 3.0, shift=2.0, callback=seen.append)
    grid = d.fm_timesteps(5, 2.0)
    assert [s["i"] for s in seen] == list(range(5))
    assert torch.equal(torch.stack([s["t"] for s in seen]), grid[:-1])
    assert torch.equal(torch.stack([s["t_next"] for s in seen]), grid[1:])
    x = noise
    for s in seen:
        assert torch.equal(s["x"], x)
        h, v0 = float(s["t_next"] - s["t"]), guided(x, s["t"])
        expect = v0 if sampler is d.sample_euler else (v0 + guided(x + h * v0, s["t_next"])) / 2
        torch.testing.assert_close(s["v"], expect, rtol=0, atol=1e-12)
        x = x + h * s["v"]
    assert torch.equal(x, out)
    assert torch.equal(out, sampler(model, noise, 5, cond, uncond, 3.0, shift=2.0))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_callback_reports_the_models_velocity_and_its_states_rebuild_the_result(prediction):
    """DDIM's callback is in diffusion variables: x = x_DM at DDIM timestep t (t_next None on the last step),
    v = x̂_0 - ε̂, the FlowModel's velocity at (x_DM / (alpha + sigma), f_t(t)). From (x, t, v) alone the
    estimates follow (x = alpha x̂_0 + sigma ε̂), hence the next state and the result."""
    flow, noise, seen = d.FlowModel(oracle(SD, prediction), SD, prediction), whitened_noise(64), []
    out = d.sample_ddim(flow, noise, 6, callback=seen.append)
    ts = d.ddim_timesteps(6, T).clamp(max=flow.t_dm_max)
    assert [s["i"] for s in seen] == list(range(6)) and torch.equal(torch.stack([s["t"] for s in seen]), ts)
    assert [s["t_next"] for s in seen[:-1]] == list(ts[1:]) and seen[-1]["t_next"] is None
    x = noise
    for s in seen:  # each state as rebuilt from the previous report (recovering x̂_0 from v rounds: allclose)
        torch.testing.assert_close(s["x"], x, rtol=0, atol=1e-10)
        x = s["x"]
        a, sg = d.alpha_sigma(s["t"], SD)
        t_fm = d.dm_to_fm_time(s["t"], SD)
        torch.testing.assert_close(s["v"], flow(x / (a + sg), t_fm.expand(len(x))), rtol=0, atol=1e-8)
        data = (x + sg * s["v"]) / (a + sg)
        if s["t_next"] is not None:
            a1, s1 = d.alpha_sigma(s["t_next"], SD)
            x = a1 * data + s1 * (data - s["v"])
    torch.testing.assert_close(data, out, rtol=0, atol=1e-10)
    assert torch.equal(out, d.sample_ddim(flow, noise, 6))


# ----------------------------------------------------------------------------------- guidance


def toy_model(calls):
    W = torch.randn(3, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def model(x, t, context):
        calls.append(x.shape[0])
        return torch.sin(x) * t.reshape(-1, 1) + context @ W
    return model


def test_cfg_one_batched_call_equals_two_calls():
    calls = []
    model = toy_model(calls)
    g = torch.Generator().manual_seed(7)
    x, noise = torch.randn(2, 4, D, generator=g, dtype=torch.float64)
    cond = torch.randn(4, 3, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 3, generator=g, dtype=torch.float64)  # one negative prompt for the batch
    t = torch.full((4,), 0.3, dtype=torch.float64)
    guided = d.cfg_velocity(model, x, t, cond, uncond, 5.0)
    assert calls == [8], "cond and uncond in one call"
    v_c, v_u = model(x, t, cond), model(x, t, uncond.expand(4, 3))
    assert torch.allclose(guided, v_u + 5.0 * (v_c - v_u), rtol=0, atol=1e-12)
    assert torch.allclose(d.cfg_velocity(model, x, 0.3, cond, uncond, 1.0), v_c, rtol=0, atol=1e-12)
    ref = d.sample_euler(lambda x, t, c: d.cfg_velocity(model, x, t, cond, uncond, 5.0), noise, 8)
    ours = d.sample_euler(model, noise, 8, cond, uncond, cfg_scale=5.0)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------- training


def point_mass_oracle(prediction):
    return oracle(SD, prediction, std=torch.zeros(D, dtype=torch.float64))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_losses_vanish_for_their_optimal_predictor(prediction):
    """Degenerate data x_1 = mu (a point mass): the optimal predictors are then exact functions of
    (x_t, t), so each loss is ~0 for its optimum and > 0 for a perturbed one. (For non-degenerate data
    even the optimum keeps the irreducible variance of the target.)"""
    g = torch.Generator().manual_seed(8)
    x1 = MU.expand(64, D).clone()
    net = point_mass_oracle(prediction)
    bad = lambda x, t, c: net(x, t, c) + 0.1
    args = (x1, None, SD, prediction)
    assert d.diffusion_loss(net, *args, generator=g) < 1e-20
    assert d.diffusion_loss(net, *args, generator=g, continuous=True) < 1e-20
    assert d.diffusion_loss(bad, *args, generator=g) > 1e-3
    t_hi = d.fm_time_range(SD, prediction)[1]
    t = torch.rand(64, generator=g, dtype=torch.float64) * t_hi  # exact in [0, t_hi], see FlowModel
    assert d.diff2flow_loss(net, *args, t=t, generator=g) < 1e-20
    assert d.diff2flow_loss(bad, *args, t=t, generator=g) > 1e-3
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.95
    for time, to_fm in (("fm", lambda u: u), ("dm_direction", lambda u: 1 - u / (T - 1))):
        v_star = lambda x, u, c: (MU - x) / (1 - to_fm(u).reshape(-1, 1))  # E[x_1 - x_0 | x_t]
        assert d.naive_fm_loss(v_star, *args, t=t, generator=g, time=time) < 1e-20
        v_bad = lambda x, u, c: v_star(x, u, c) + 0.1  # noqa: E731
        assert d.naive_fm_loss(v_bad, *args, t=t, generator=g, time=time) > 1e-3


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diff2flow_loss_is_the_fm_loss_of_the_converted_model(prediction):
    """At the start of fine-tuning the Diff2Flow loss is the FM loss of FlowModel(unet) on the same
    noise and t; the naive FM loss of the same network is far off (it ignores the parameterization)."""
    g = torch.Generator().manual_seed(9)
    x1 = MU + STD * torch.randn(256, D, generator=g, dtype=torch.float64)
    noise = torch.randn(256, D, generator=g, dtype=torch.float64)
    t = d.sample_fm_time(256, "uniform", g, dtype=torch.float64)
    net = oracle(SD, prediction)
    x_t = t.reshape(-1, 1) * x1 + (1 - t.reshape(-1, 1)) * noise
    by_hand = (d.FlowModel(net, SD, prediction)(x_t, t) - (x1 - noise)).square().mean()
    ours = d.diff2flow_loss(net, x1, None, SD, prediction, noise=noise, t=t)
    assert torch.allclose(ours, by_hand, rtol=1e-12, atol=0)
    naive = d.naive_fm_loss(net, x1, None, SD, prediction, noise=noise, t=t)
    assert naive > 1.5 * ours and naive - ours > 0.5, (naive.item(), ours.item())


def test_losses_are_reproducible_with_a_generator():
    x1 = MU.expand(16, D).clone()
    net = oracle(SD, "v")
    for loss in (d.diffusion_loss, d.naive_fm_loss, d.diff2flow_loss):
        a, b = (loss(net, x1, None, SD, "v", generator=torch.Generator().manual_seed(10)) for _ in range(2))
        assert a == b and torch.isfinite(a)


def test_fm_time_sampling_statistics():
    n = 200_000
    u = d.sample_fm_time(n, "uniform", torch.Generator().manual_seed(11), dtype=torch.float64)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 4 * (1 / 12 / n) ** 0.5 and abs(u.var() - 1 / 12) < 1e-3
    ln = d.sample_fm_time(n, "logit_normal", torch.Generator().manual_seed(12), dtype=torch.float64)
    assert 0 < ln.min() and ln.max() < 1
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean()) < 4 / n**0.5 and abs(logit.std() - 1) < 4 / (2 * n) ** 0.5, "logit ~ N(0, 1)"
    assert torch.equal(d.sample_fm_time(5, "noise_end", dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise_end"):
        d.sample_fm_time(5, "shifted")


def test_noise_end_training_is_the_one_step_samplers_regression():
    """--t-sampling noise_end trains the prediction a 1-step Euler sampler uses: at t = 0, x_t = x_0 (the noise) and
    one Euler step x_0 + v lands on x_1 exactly when v = x_1 - x_0, so the FM loss at t = 0 is the 1-step sample's
    squared error, || x_0 + v(x_0, 0) - x_1 ||²."""
    x1, noise = torch.randn(6, D, dtype=torch.float64), torch.randn(6, D, dtype=torch.float64)
    net = oracle(SD, "v")
    loss = d.diff2flow_loss(net, x1, None, SD, "v", noise=noise, t_sampling="noise_end")
    flow = d.FlowModel(net, SD, "v")
    one_step = d.sample_euler(flow, noise, 1)
    torch.testing.assert_close(loss, ((one_step - x1) ** 2).mean(), rtol=1e-12, atol=0)


def test_time_shift():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.equal(d.shift_time(t, 1.0), t)
    for shift in (0.5, 3.0):
        ts = d.shift_time(t, shift)
        assert (ts.diff() > 0).all() and ts[0] == 0 and ts[-1] == 1
        sigma = 1 - t  # SD3's form on the noise level
        assert torch.allclose(1 - ts, shift * sigma / (1 + (shift - 1) * sigma), rtol=0, atol=1e-15)
    assert (d.shift_time(t, 3.0) <= t).all(), "shift > 1: more steps near noise (t = 0)"
    grid = d.fm_timesteps(20, 3.0)
    assert grid[0] == 0 and grid[-1] == 1 and len(grid) == 21


def test_flow_model_runs_a_bf16_unet():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D + 1, D)

        def forward(self, x, t, context=None):
            return self.lin(torch.cat([x, (t / T).to(x.dtype).reshape(-1, 1)], dim=-1))

    g = torch.Generator().manual_seed(13)
    net = Tiny()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x, t = torch.randn(16, D, generator=g), torch.rand(16, generator=g)
    ref = d.FlowModel(net, SD, "v")(x, t)
    flow = d.FlowModel(Tiny().to(torch.bfloat16), SD, "v")
    flow.unet.load_state_dict(net.state_dict())
    out = flow(x, t)
    assert out.dtype == torch.float32 and flow.alphas_cumprod.dtype == torch.float64
    assert torch.allclose(out, ref, rtol=0, atol=0.1), "bf16 UNet, atol 0.1"
