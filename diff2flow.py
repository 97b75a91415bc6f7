"""Diff2Flow: turn a pretrained diffusion UNet into a flow-matching (FM) velocity model.

Schusterbauer, Gui, Fundel, Ommer, "Diff2Flow: Training Flow Matching Models via Diffusion Model
Alignment", CVPR 2025, arXiv 2506.02221. Paper symbols and their names in the code:

  diffusion (DM)  x_t = alpha_t x_0 + sigma_t eps,  alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
                  x_0 = data, eps = noise, t_DM in [0, T-1]               (code: x_dm, t_dm, a, s)
  flow (FM)       x_t = t x_1 + (1 - t) x_0, t = 0 noise, t = 1 data       (code: x_fm, t_fm)
                  target velocity x_1 - x_0.  NB: FM's x_0 is noise, DM's x_0 is data.
  f_t             t_FM = alpha_t / (alpha_t + sigma_t)            timestep rescaling, f_t^-1 its inverse
  f_x^-1          x_DM = (alpha_t + sigma_t) x_FM                 interpolant alignment
  velocity        v = x̂_1 - x̂_0 = x̂_0^DM - ε̂  from the eps- or v-prediction
  objective       E || v_θ(x_t, t) - (x_1 - x_0) ||²  through these conversions

Diffusion time is continuous in [0, T-1], T = len(alphas_cumprod): an integer k means
alphas_cumprod[k], exactly the timestep the UNet was trained at, and abar is linear in between.
(The official code prepends abar = 1 to build a 1001-entry table and indexes the 1000-entry UNet
schedule with it, a one-step offset; we never mix the two.) Schedule math runs in float64. Every
function takes the schedule as `alphas_cumprod`; SD's own (sd.sd_alphas_cumprod) belongs to the
checkpoint format and lives in sd.py, which this module does not import.

The ends: only t_FM in [f_t(T-1), f_t(0)] = [0.0640425, 0.9716595] have a diffusion timestep with
the SD schedule; [0, 0.9716595] with zero terminal SNR ([f_t(T-2), ...] = [0.00044, ...] for an eps
model there, see max_dm_time). FlowModel defines and documents v outside; samplers integrate all
of [0, 1], from pure noise at t = 0 to data at t = 1.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ---------------------------------------------------------------------------------- schedules


def rescale_zero_terminal_snr(alphas_cumprod):
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar) so that abar_{T-1} = 0 (SNR 0) while
    abar_0 is unchanged. Written on sqrt(abar) directly, which is what the algorithm does via betas."""
    a = alphas_cumprod.double().sqrt()
    a0, a_last = a[0].clone(), a[-1].clone()
    a = (a - a_last) * a0 / (a0 - a_last)
    return (a**2).to(alphas_cumprod.dtype)


def _bc(v, x):
    """Broadcast a per-sample (B,) or scalar tensor against x (B, ...), on x's device and dtype."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _float(x):
    """The dtype we do arithmetic in: at least float32 (the UNet itself may run in bf16/fp16)."""
    return torch.promote_types(x.dtype, torch.float32)


def _out_dtype(t):
    """Schedule functions compute in float64 and answer in the input's float dtype."""
    return t.dtype if torch.is_tensor(t) and t.is_floating_point() else torch.float64


def _per_sample(t, x):
    """A scalar or (B,) time as a (B,) tensor on x's device (a Python number in x's float dtype)."""
    t = t if torch.is_tensor(t) else torch.tensor(t, dtype=_float(x))
    return t.to(x.device).reshape(-1).expand(x.shape[0])


def abar_at(t_dm, alphas_cumprod):
    """abar(t_DM), linear in abar between the integer timesteps; t_DM is clamped to [0, T-1]."""
    ac = alphas_cumprod.double()
    t = torch.as_tensor(t_dm, device=ac.device).double().clamp(0, len(ac) - 1)
    k = t.floor().long().clamp(max=len(ac) - 2)
    w = t - k
    return (1 - w) * ac[k] + w * ac[k + 1]


def alpha_sigma(t_dm, alphas_cumprod):
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)), float64."""
    abar = abar_at(t_dm, alphas_cumprod)
    return abar.sqrt(), (1 - abar).sqrt()


# --------------------------------------------------------------------- the three alignments


def dm_to_fm_time(t_dm, alphas_cumprod):
    """Timestep rescaling f_t: t_FM = alpha_t / (alpha_t + sigma_t). 0 = noise, 1 = data."""
    a, s = alpha_sigma(t_dm, alphas_cumprod)
    return (a / (a + s)).to(_out_dtype(t_dm))


def fm_to_dm_time(t_fm, alphas_cumprod):
    """Exact inverse f_t^-1 of the piecewise-linear-in-abar f_t, clamped to [0, T-1].

    With r = t_FM: alpha/(alpha + sigma) = r  <=>  abar = r² / (r² + (1-r)²)  (the same as
    q/(1+q), q = (r/(1-r))², but finite at r = 1). Then find the piece k with
    abar_k >= abar >= abar_{k+1} (abar decreases) by a search on the flipped table and solve the
    linear piece. FM times outside [f_t(T-1), f_t(0)] clamp to the last/first timestep."""
    ac = alphas_cumprod.double()
    r = torch.as_tensor(t_fm, device=ac.device).double()
    abar = (r**2 / (r**2 + (1 - r) ** 2)).clamp(ac[-1], ac[0])
    i = torch.searchsorted(ac.flip(0).contiguous(), abar)  # ac.flip(0)[i-1] < abar <= ac.flip(0)[i]
    k = (len(ac) - 1 - i).clamp(0, len(ac) - 2)  # so ac[k] >= abar >= ac[k+1]
    t = k + (ac[k] - abar) / (ac[k] - ac[k + 1])
    return t.clamp(0, len(ac) - 1).to(_out_dtype(t_fm))


def fm_to_dm_scale(t_fm, alphas_cumprod=None):
    """Interpolant alignment f_x^-1 scale, x_DM = (alpha_t + sigma_t) x_FM with t = f_t^-1(t_FM).

    `alphas_cumprod` is accepted for symmetry with the time maps but not needed: the scale depends
    on t_FM alone (below).

    In closed form alpha = r / n, sigma = (1-r) / n, n = sqrt(r² + (1-r)²), so the scale is 1 / n:
    no table needed, and it stays the exact VP scale (alpha² + sigma² = 1) at every t_FM in [0, 1],
    including the ends where no diffusion timestep exists (1 at t = 0 and t = 1)."""
    r = torch.as_tensor(t_fm).double()
    return (r**2 + (1 - r) ** 2).rsqrt()


def max_dm_time(alphas_cumprod, prediction):
    """Largest usable timestep: T-1, but T-2 for an eps-model with zero terminal SNR, whose
    x̂_0 = (x - sigma ε̂) / alpha is undefined where alpha = 0; T-2 is the nearest trained timestep
    with alpha > 0 (a v-model is fine at alpha = 0: x̂_0 = -v there)."""
    T = len(alphas_cumprod)
    return T - 2 if prediction == "eps" and alphas_cumprod[-1] == 0 else T - 1


def fm_time_range(alphas_cumprod, prediction):
    """[t_lo, t_hi] = [f_t(max_dm_time), f_t(0)]: the FM times that have a diffusion timestep."""
    ends = torch.tensor([max_dm_time(alphas_cumprod, prediction), 0.0], dtype=torch.float64)
    t_lo, t_hi = dm_to_fm_time(ends, alphas_cumprod).tolist()
    return t_lo, t_hi


def split_prediction(pred, x_dm, a, s, prediction):
    """(x̂_0^DM, ε̂) = (data, noise) estimates from the network output at (alpha, sigma) = (a, s).

    eps: x̂_0 = (x_t - sigma ε̂) / alpha.  v (Salimans & Ho 2022, v = alpha eps - sigma x_0):
    x̂_0 = alpha x_t - sigma v,  ε̂ = sigma x_t + alpha v.  In FM notation these are (x̂_1, x̂_0)."""
    a, s = _bc(a, x_dm), _bc(s, x_dm)
    if prediction == "eps":
        return (x_dm - s * pred) / a, pred
    if prediction == "v":
        return a * x_dm - s * pred, s * x_dm + a * pred
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def unet_call(unet, x, t, context):
    """unet(x, t, context) with x cast to the UNet's parameter dtype (bf16/fp16 are fine), t in at
    least float32 (fractional timesteps need it), and the output back in _float(x)."""
    p = next(unet.parameters(), None) if isinstance(unet, nn.Module) else None
    dtype = p.dtype if p is not None else x.dtype
    t = torch.as_tensor(t, device=x.device).to(_float(x))
    return unet(x.to(dtype), t, context).to(_float(x))


class FlowModel(nn.Module):
    """A diffusion UNet seen as an FM velocity model v_θ(x_t, t) (the paper's Diff2Flow model).

    forward(x_fm, t_fm, context): t_DM = f_t^-1(t_FM), x_DM = f_x^-1(x_FM), pred = unet(x_DM, t_DM),
    v = x̂_1 - x̂_0. Exact wherever t_FM in [t_lo, t_hi] = fm_time_range(...). Outside, at the ends:
      (a) t_DM is clamped to [0, max_dm_time]: the network was never trained beyond, and its
          prediction at the boundary timestep is the best estimate it can give;
      (b) x_DM = x_FM / sqrt(t² + (1-t)²) is still the exact VP interpolant alpha(t) x_1 + sigma(t) x_0
          of the *actual* t (unit scale for unit-variance data); only its timestep label is clamped;
      (c) the clamped network's estimate of the *far* endpoint is kept and the near one is solved
          from the actual interpolant x_t = t x̂_1 + (1-t) x̂_0:
             t < t_lo:  x̂_0 = (x_t - t x̂_1)/(1-t)      =>  v = (x̂_1 - x_t) / (1 - t)
             t > t_hi:  x̂_1 = (x_t - (1-t) x̂_0)/t      =>  v = (x_t - x̂_0) / t
          Inside [t_lo, t_hi] both formulas equal x̂_1 - x̂_0 (there x_t = t x̂_1 + (1-t) x̂_0 holds
          exactly), so v is continuous; at t = 0 (t = 1) the near endpoint x_0 = x_t (x_1 = x_t) is
          known exactly, and the end formulas divide only by 1 - t > 1 - t_lo or t > t_hi.
    The cost is a small bias of the flow from the clamped stretches: for Gaussian data of std s the
    sample std is off by t_lo² s²/2 - (1 - t_hi)²/(2 s²) relative, to first order (+0.16% for unit
    variance with the SD schedule; tests/test_diff2flow.py checks this formula).
    The UNet may run in bf16 (see unet_call); cast it with flow.unet.to(...), not flow.to(...),
    which would also cast the float64 schedule buffer."""

    def __init__(self, unet, alphas_cumprod, prediction: str):
        super().__init__()
        self.unet, self.prediction = unet, prediction
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod).double(), persistent=False)
        self.t_dm_max = max_dm_time(self.alphas_cumprod, prediction)
        self.t_lo, self.t_hi = fm_time_range(self.alphas_cumprod, prediction)

    def predict(self, x_dm, t_dm, context=None):
        """The raw diffusion prediction (eps or v) in diffusion variables."""
        return unet_call(self.unet, x_dm, t_dm, context)

    def forward(self, x_fm, t_fm, context=None):
        t = _per_sample(t_fm, x_fm).double()  # (B,)
        t_dm = fm_to_dm_time(t, self.alphas_cumprod).clamp(max=self.t_dm_max)  # rule (a)
        x = x_fm.to(_float(x_fm))
        x_dm = _bc(fm_to_dm_scale(t), x) * x  # rule (b)
        a, s = alpha_sigma(t_dm, self.alphas_cumprod)
        x1_hat, x0_hat = split_prediction(self.predict(x_dm, t_dm, context), x_dm, a, s, self.prediction)
        t = _bc(t, x)
        v = x1_hat - x0_hat  # paper: v = x̂_1 - x̂_0
        # rule (c); the denominators are clamped so that the branch torch.where discards holds no
        # inf either, which would otherwise turn into NaN gradients
        v = torch.where(t < self.t_lo, (x1_hat - x) / (1 - t).clamp(min=1 - self.t_lo), v)
        v = torch.where(t > self.t_hi, (x - x0_hat) / t.clamp(min=self.t_hi), v)
        return v.to(x_fm.dtype)


class NaiveVelocity(nn.Module):
    """A naively FM-fine-tuned UNet (see naive_fm_loss): its output IS the velocity, its timestep is
    t_FM itself (time="fm") or (1 - t_FM)(T - 1) (time="dm_direction")."""

    def __init__(self, unet, T: int, time: str = "fm"):
        super().__init__()
        self.unet, self.T, self.dm_direction = unet, T, time == "dm_direction"

    def forward(self, x, t, context=None):
        t = _per_sample(t, x)
        return unet_call(self.unet, x, (1 - t) * (self.T - 1) if self.dm_direction else t, context).to(x.dtype)


class ConcatCond(nn.Module):
    """unet(cat([x, cond]), t, context): conditioning by channel concatenation (Marigold's image latent for
    depth). The conversions act on x alone: cond is the same clean latent at every t, never rescaled."""

    def __init__(self, unet, cond):
        super().__init__()
        self.unet, self.cond = unet, cond

    def forward(self, x, t, context=None):
        return self.unet(torch.cat([x, self.cond.to(x.dtype)], dim=1), t, context)  # (B, C + C_cond, h, w)


def velocity_model(unet, alphas_cumprod, prediction, objective):
    """The velocity v(x_t, t, context) that the samplers integrate, for a UNet trained with `objective`:
    diffusion (zero-shot) and diff2flow (fine-tuned) read the UNet through the same conversions."""
    if objective in ("diffusion", "diff2flow"):
        device = next(unet.parameters()).device  # the float64 schedule lives beside the UNet
        return FlowModel(unet, torch.as_tensor(alphas_cumprod).to(device), prediction)
    if objective in ("fm", "fm_dm_direction"):
        return NaiveVelocity(unet, len(alphas_cumprod), "fm" if objective == "fm" else "dm_direction")
    raise ValueError(f"unknown objective {objective!r}: expected diffusion, diff2flow, fm or fm_dm_direction")


# ------------------------------------------------------------------------------------- training


FM_TIME_SAMPLINGS = ("uniform", "logit_normal", "noise_end")


def sample_fm_time(n: int, kind: str = "uniform", generator=None, device=None, dtype=torch.float32):
    """FM training times: t ~ U[0, 1] (the paper's), logit-normal t = sigmoid(N(0, 1)) (Esser et al. 2024), or
    noise_end: t = 0 only, the one time a 1-step Euler sampler evaluates, so training spends every step on the
    prediction the sampler uses: single-step fine-tuning of an image-conditional model (Garcia et al. 2024,
    "Fine-tuning Image-Conditional Diffusion Models is Easier than You Think", for Marigold's depth)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device, dtype=dtype)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device, dtype=dtype))
    if kind == "noise_end":
        return torch.zeros(n, device=device, dtype=dtype)
    raise ValueError(f"unknown FM time sampling {kind!r}: expected one of {', '.join(FM_TIME_SAMPLINGS)}")


def _noise_like(x1, noise, generator):
    if noise is not None:
        return noise
    return torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)


def fm_loss(velocity_fn, x1, noise, t, context=None):
    """FM objective || v(x_t, t) - (x_1 - x_0) ||² (mean over all elements), x_t = t x_1 + (1-t) x_0,
    x_0 = noise. velocity_fn(x_t, t, context) is e.g. a FlowModel."""
    x_t = _bc(t, x1) * x1 + (1 - _bc(t, x1)) * noise
    return F.mse_loss(velocity_fn(x_t, t, context).to(_float(x1)), (x1 - noise).to(_float(x1)))


def diffusion_loss(unet, x1, context, alphas_cumprod, prediction, noise=None, t=None, generator=None,
                   continuous: bool = False):
    """DDPM loss (Ho et al. 2020) || pred(x_t, t) - target ||², x_t = alpha_t x_0 + sigma_t eps, target
    eps or v = alpha_t eps - sigma_t x_0. t: integers in [0, T-1] like SD training, or continuous."""
    T, B = len(alphas_cumprod), x1.shape[0]
    if t is None:
        u = torch.rand(B, generator=generator, device=x1.device, dtype=torch.float64)
        t = u * (T - 1) if continuous else (u * T).floor().clamp(max=T - 1)
    noise = _noise_like(x1, noise, generator)
    a, s = (_bc(c, x1) for c in alpha_sigma(t, alphas_cumprod))
    target = noise if prediction == "eps" else a * noise - s * x1
    return F.mse_loss(unet_call(unet, a * x1 + s * noise, t, context), target.to(_float(x1)))


def naive_fm_loss(unet, x1, context, alphas_cumprod, prediction, noise=None, t=None, generator=None,
                  t_sampling: str = "uniform", time: str = "fm"):
    """Naive FM fine-tuning baseline: FM loss with the raw UNet output read as the velocity, the FM
    interpolant fed as is, and time="fm": t_FM in [0, 1] passed straight in as the timestep (as the
    official code does), or time="dm_direction": (1 - t_FM)(T - 1), the ablation that at least gives
    the UNet timesteps in its trained range and direction. `prediction` is unused (shared signature)."""
    if time not in ("fm", "dm_direction"):
        raise ValueError(f"time must be 'fm' or 'dm_direction', got {time!r}")
    T = len(alphas_cumprod)
    t = sample_fm_time(x1.shape[0], t_sampling, generator, x1.device, x1.dtype) if t is None else t

    def velocity(x, t, c):
        return unet_call(unet, x, t if time == "fm" else (1 - t) * (T - 1), c)
    return fm_loss(velocity, x1, _noise_like(x1, noise, generator), t, context)


def diff2flow_loss(unet, x1, context, alphas_cumprod, prediction, noise=None, t=None, generator=None,
                   t_sampling: str = "uniform"):
    """The Diff2Flow objective: the FM loss of FlowModel(unet), i.e. through f_t^-1, f_x^-1 and
    v = x̂_1 - x̂_0. t covers all of [0, 1]; outside [t_lo, t_hi] FlowModel's end rule makes it a
    clean regression of x_1 (noise end) or x_0 (data end) at the boundary timestep, scaled by 1/(1-t)
    or 1/t, so fine-tuning also covers the ends the sampler visits."""
    t = sample_fm_time(x1.shape[0], t_sampling, generator, x1.device, x1.dtype) if t is None else t
    flow = FlowModel(unet, alphas_cumprod, prediction)
    return fm_loss(flow, x1, _noise_like(x1, noise, generator), t, context)


# ------------------------------------------------------------------------------------- sampling


# objective name (as checkpoints record it) -> loss(unet, x1, context, alphas_cumprod, prediction, noise, t)
LOSSES = {"diffusion": diffusion_loss, "diff2flow": diff2flow_loss,
          "fm": functools.partial(naive_fm_loss, time="fm"),
          "fm_dm_direction": functools.partial(naive_fm_loss, time="dm_direction")}


def shift_time(t, shift: float = 1.0):
    """SD3 time shift (Esser et al. 2024) on the noise level sigma = 1 - t:
    sigma' = shift sigma / (1 + (shift - 1) sigma), i.e. t' = t / (t + shift (1 - t)).
    Monotone, fixes 0 and 1; shift > 1 puts more of a uniform grid's steps near noise (t = 0)."""
    return t / (t + shift * (1 - t))


def fm_timesteps(steps: int, shift: float = 1.0):
    """FM time grid 0 = t_0 < ... < t_steps = 1 (float64), uniform before the shift."""
    return shift_time(torch.linspace(0, 1, steps + 1, dtype=torch.float64), shift)


def ddim_timesteps(steps: int, T: int, shift: float = 1.0):
    """DDIM timesteps with "trailing" spacing, round(T (1 - u)) - 1 for u = shift_time(k / steps),
    k < steps: it starts at T-1 exactly (needed for zero terminal SNR; "leading" spacing never gets
    there); shift=1 is diffusers' trailing spacing, e.g. 999, 979, ..., 19 for 50 steps."""
    u = shift_time(torch.arange(steps, dtype=torch.float64) / steps, shift)
    return torch.round(T * (1 - u)) - 1


def cfg_velocity(model, x, t, cond, uncond, scale: float):
    """Classifier-free guidance (Ho & Salimans 2022): out_u + scale (out_c - out_u) from ONE batched
    call of model(x, t, context). uncond (1 or B rows) is the empty or negative prompt embedding."""
    t = _per_sample(t, x)
    uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    out_u, out_c = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
    return out_u + scale * (out_c - out_u)


def _guided(model, x, t, context, uncond, cfg_scale):
    if uncond is None or cfg_scale == 1.0:
        return model(x, _per_sample(t, x), context)
    return cfg_velocity(model, x, t, context, uncond, cfg_scale)


def _steps(ts, progress):
    return tqdm(list(zip(ts[:-1], ts[1:])), disable=not progress)


def sample_euler(model, noise, steps, context=None, uncond=None, cfg_scale=1.0, shift=1.0, progress=False,
                 callback=None):
    """Euler's method on the FM ODE dx/dt = v(x, t), from x_0 = noise at t = 0 to data at t = 1.
    callback (k-diffusion style): callback({"i", "x", "t", "t_next", "v"}) once per step, with the guided
    velocity v at (x, t), before the update x + (t_next - t) v."""
    x = noise
    for i, (t0, t1) in enumerate(_steps(fm_timesteps(steps, shift), progress)):
        v = _guided(model, x, t0, context, uncond, cfg_scale)
        if callback is not None:
            callback({"i": i, "x": x, "t": t0, "t_next": t1, "v": v})
        x = x + float(t1 - t0) * v
    return x


def sample_heun(model, noise, steps, context=None, uncond=None, cfg_scale=1.0, shift=1.0, progress=False,
                callback=None):
    """Heun's method (explicit trapezoid, 2 evaluations per step) on the FM ODE, t = 0 -> 1.
    callback: as sample_euler's, once per step, with v the average of the step's two velocities."""
    x = noise
    for i, (t0, t1) in enumerate(_steps(fm_timesteps(steps, shift), progress)):
        h = float(t1 - t0)
        v0 = _guided(model, x, t0, context, uncond, cfg_scale)
        v1 = _guided(model, x + h * v0, t1, context, uncond, cfg_scale)
        v = (v0 + v1) / 2  # halving is exact: x + h v is bit-identical to x + h (v0 + v1) / 2
        if callback is not None:
            callback({"i": i, "x": x, "t": t0, "t_next": t1, "v": v})
        x = x + h * v
    return x


def sample_ddim(model, noise, steps, context=None, uncond=None, cfg_scale=1.0, shift=1.0, progress=False,
                callback=None):
    """DDIM (Song et al. 2021, eta = 0) on model.unet in diffusion variables; model is a FlowModel.

    Starts from x = noise at t_DM = T-1 (the standard approximation: abar_{T-1} = 0.0047 > 0 for SD,
    so the true x_{T-1} still holds 7% signal; exact with zero terminal SNR; an eps-model with zero
    terminal SNR starts at T-2, see max_dm_time). The last step returns x̂_0, i.e. data.
    callback: as sample_euler's, in diffusion variables: x = x_DM, t and t_next are DDIM timesteps (t_next
    None on the last step, which returns x̂_0), v = x̂_0 - ε̂ is the model's velocity (Diff2Flow's v)."""
    ac, x = model.alphas_cumprod, noise.to(_float(noise))
    ts = ddim_timesteps(steps, len(ac), shift).clamp(max=model.t_dm_max)
    for i, t in enumerate(tqdm(ts, disable=not progress)):
        pred = _guided(model.predict, x, t, context, uncond, cfg_scale)
        data, eps = split_prediction(pred, x, *alpha_sigma(t, ac), model.prediction)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_next": ts[i + 1] if i + 1 < len(ts) else None, "v": data - eps})
        if i + 1 < len(ts):  # DDIM eta = 0: re-noise x̂_0 with the predicted ε̂ at the next timestep
            a, s = (_bc(c, x) for c in alpha_sigma(ts[i + 1], ac))
            x = a * data + s * eps
    return data.to(noise.dtype)  # the final step goes to abar = 1: x = x̂_0
