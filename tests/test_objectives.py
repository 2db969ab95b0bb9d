"""MeanFlow, shortcut models and consistency training: their losses and times against float64
NumPy written from the papers; MeanFlow's identity, the shortcut target and the few-step samplers
on Gaussian data, whose average velocity and consistency function are known in closed form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, objectives, processes, samplers, step_tables

S = 0.5  # the data's standard deviation: x ~ N(0, S^2 I)


def marginal_std(t):
  """The std of z_t = (1 - t) x + t eps: sqrt((1 - t)^2 S^2 + t^2)."""
  return jnp.sqrt((1 - t) ** 2 * S ** 2 + t ** 2)


def exact_u(z, t, r):
  """The average velocity over [r, t] of Gaussian data's flow: its ODE maps z_t to
  z_r = (std_r / std_t) z_t, so u = (z - z_r) / (t - r) (t > r)."""
  col = lambda a: a[:, None]
  return z * col((1 - marginal_std(r) / marginal_std(t)) / (t - r))


def exact_v(z, t):
  """The marginal velocity E[eps - x | z_t] = z d/dt log std_t."""
  return z * ((t - (1 - t) * S ** 2) / marginal_std(t) ** 2)[:, None]


def gaussian_pairs(seed: int, t_hi: float):
  """64 examples of Gaussian data in 3-D with noise, t in [0.3, t_hi) and r in [0, 0.9 t)."""
  rng = np.random.default_rng(seed)
  x0, noise = rng.normal(0, S, (64, 3)), rng.normal(size=(64, 3))
  t = rng.uniform(0.3, t_hi, 64)
  return tuple(map(jnp.asarray, (x0, noise, t, t * rng.uniform(0.0, 0.9, 64))))


def test_the_meanflow_identity_holds_for_the_exact_average_velocity():
  """With the marginal velocity in place of eps - x, the target v - (t - r) du/dt of the exact u
  is u itself (float64): the JVP's directions (v in z, 1 in t, 0 in r) are the paper's."""
  with jax.enable_x64(True):
    x0, noise, t, r = gaussian_pairs(0, 0.99)
    loss = lambda u_fn: objectives.meanflow_loss_per_example(
        u_fn, x0, noise, t, r, weight_power=0.0, guided_v=lambda z, v: exact_v(z, t))
    assert float(jnp.max(loss(exact_u))) < 1e-20
    # A network that is off by a term that grows with the step's length fails.
    assert float(jnp.min(loss(lambda z, t, r: exact_u(z, t, r) * (1 + 0.1 * (t - r)[:, None])))
                 ) > 1e-6


def test_meanflow_loss_matches_float64_numpy():
  """u(z, t, r) = sin(z) t^2 + r z: d/dt u along (v, 1, 0) = cos(z) t^2 v + r v + 2 t sin(z)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x0, noise = rng.normal(size=(16, 2, 2, 1)), rng.normal(size=(16, 2, 2, 1))
    t = rng.uniform(0.0, 1.0, 16)
    r = t * rng.uniform(0.0, 1.0, 16)
    col = lambda a: a[:, None, None, None]
    z = (1 - col(t)) * x0 + col(t) * noise
    v = noise - x0
    u = np.sin(z) * col(t) ** 2 + col(r) * z
    du_dt = np.cos(z) * col(t) ** 2 * v + col(r) * v + 2 * col(t) * np.sin(z)
    err = ((u - (v - col(t - r) * du_dt)) ** 2).mean(axis=(1, 2, 3))
    u_fn = lambda z, t, r: jnp.sin(z) * t[:, None, None, None] ** 2 + r[:, None, None, None] * z
    for p in (0.0, 1.0, 0.5):
      got = objectives.meanflow_loss_per_example(
          u_fn, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), jnp.asarray(r),
          weight_power=p, weight_eps=1e-3)
      np.testing.assert_allclose(got, err / (err + 1e-3) ** p, rtol=1e-12)
      # The weight is a constant of the gradient: d loss / d u = sg(w) d|delta|^2 / du.
    grad = jax.grad(lambda a: jnp.sum(objectives.meanflow_loss_per_example(
        lambda z, t, r: a * u_fn(z, t, r), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t),
        jnp.asarray(r), weight_power=1.0)))(1.0)
    target = v - col(t - r) * du_dt
    d_err = (2 * (u - target) * u).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(grad, np.sum(d_err / (err + 1e-3)), rtol=1e-10)


def test_meanflow_times():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  t1, t2, coin = (jax.random.uniform(k, (10_000,)) for k in keys)
  t, r = objectives.meanflow_times(t1, t2, coin, 0.25)
  assert bool(jnp.all(t >= r)) and bool(jnp.all(t == jnp.maximum(t1, t2)))
  assert abs(float(jnp.mean(t != r)) - 0.25) < 0.02


@pytest.mark.parametrize('num_steps', [1, 2, 4])
def test_euler_rows_told_their_end_are_exact_with_the_exact_average_velocity(num_steps):
  """One network call per step, each an Euler row whose network receives the row's end: with
  the exact u of Gaussian data every step is the ODE's exact map, std_0 / std_T times the start
  (float64)."""
  with jax.enable_x64(True):
    process = processes.Flow()
    steps = step_tables.build('ddim', process, num_steps=num_steps, spacing='trailing')
    ends = samplers.row_ends(steps, process)
    np.testing.assert_allclose(ends, np.append(steps.t[1:], 0.0))

    def predict(x_in, t_net, interval):
      t = t_net / processes.NET_TIME_SCALE
      return exact_u(x_in, t, t - interval / processes.NET_TIME_SCALE)

    denoise_fn = diffusion.denoiser(predict, process, 'flow')
    x_T = jax.random.normal(jax.random.PRNGKey(0), (256, 2), jnp.float64)
    got = samplers.run_reverse(denoise_fn, steps, x_T, jax.random.PRNGKey(1), clip_x0=False,
                               row_ends=ends)
    start = steps.init_scale * x_T
    want = start * S / marginal_std(jnp.asarray(steps.t[0]))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert steps.num_calls == num_steps


def test_row_ends_of_an_inpainting_table_are_its_blend_levels():
  from diffusion_jax import editing  # pylint: disable=g-import-not-at-top
  process = processes.Flow()
  steps = editing.for_inpainting(step_tables.build('ddim', process, num_steps=6,
                                                   spacing='trailing'), process, 2, 2)
  ends = samplers.row_ends(steps, process)
  alpha, sigma = process.alpha_sigma(ends)
  np.testing.assert_allclose(alpha, steps.alpha_next, atol=1e-12)
  np.testing.assert_allclose(sigma, steps.sigma_next, atol=1e-12)


def test_objectives_are_refused_where_their_papers_do_not_define_them():
  for allowed in (('meanflow', 'flow', 'flow', True), ('denoise', 'ddpm', 'eps', False),
                  ('shortcut', 'flow', 'flow', True), ('consistency', 'edm', 'edm', False)):
    objectives.check(*allowed)
  for refused, named in (
      (('meanflow', 'edm', 'flow', True), 'diffusion.process=flow'),
      (('meanflow', 'flow', 'eps', True), 'diffusion.prediction_type=flow'),
      (('meanflow', 'flow', 'flow', False), 'model.interval_embedding=True'),
      (('shortcut', 'ddpm', 'flow', True), 'training.objective=shortcut .* diffusion.process=flow'),
      (('shortcut', 'flow', 'flow', False), 'model.interval_embedding=True'),
      (('consistency', 'vp', 'edm', False),
       'training.objective=consistency .* diffusion.process=edm'),
      (('consistency', 'edm', 'eps', False), 'diffusion.prediction_type=edm'),
      (('flowmatching', 'flow', 'flow', False), 'training.objective=.* is unknown')):
    with pytest.raises(ValueError, match=named):
      objectives.check(*refused)


def test_trained_in_guidance_mixes_in_the_unconditional_velocity_for_labelled_examples():
  """training.meanflow_guidance w: v -> w v + (1 - w) u(z, t, t | no label) where the label was
  kept, v where it was dropped to the null label."""
  z = jnp.arange(6.0).reshape(3, 2)
  guided = objectives.trained_in_guidance(lambda z: z + 3.0, jnp.array([True, False, True]), 2.0)
  zn = np.asarray(z)
  want = np.stack([2.0 - (zn[0] + 3.0), np.ones(2), 2.0 - (zn[2] + 3.0)])
  np.testing.assert_array_equal(guided(z, jnp.ones((3, 2))), want)


# --- shortcut models ----------------------------------------------------------------------------

def test_shortcut_times_lie_on_their_grid():
  """2d = t - r = 2^-k, k in {0, ..., log2(M) - 1}, t a positive multiple of 2d within [2d, 1]."""
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  u1, u2 = (np.asarray(jax.random.uniform(k, (20_000,)), np.float64) for k in keys)
  t, r = (np.asarray(a, np.float64) for a in objectives.shortcut_times(u1, u2, 128))
  k = np.minimum(np.floor(u1 * 7), 6)
  step = 2.0 ** -k
  j = np.minimum(np.floor(u2 / step), 1 / step - 1) + 1
  np.testing.assert_allclose(t - r, step, rtol=1e-6)
  np.testing.assert_allclose(t, j * step, rtol=1e-6)
  assert t.max() <= 1.0 and r.min() >= 0.0
  assert set(np.round(np.log2(t - r)).astype(int)) == set(range(-6, 1))


def u_test(z, t, r):
  """A network stand-in for the float64 checks: sin(z) t^2 + r z."""
  col = lambda a: a.reshape((-1,) + (1,) * (z.ndim - 1))
  return jnp.sin(z) * col(t) ** 2 + col(r) * z


def test_shortcut_loss_matches_float64_numpy():
  """The first `consistent` examples: u(z, t, r) against (u(z, t, m) + u(z - (t - m) u(z, t, m), m,
  r)) / 2, m = (t + r) / 2; the rest: against v = eps - x (Frans et al. 2024, eq. 5-6, in this
  project's time, where the data are at t = 0)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x0, noise = rng.normal(size=(12, 2, 2, 1)), rng.normal(size=(12, 2, 2, 1))
    t = rng.uniform(0.2, 1.0, 12)
    r = np.where(np.arange(12) < 5, t - rng.uniform(0.0, 0.2, 12), t)
    col = lambda a: a[:, None, None, None]
    f = lambda z, t, r: np.sin(z) * col(t) ** 2 + col(r) * z
    z = (1 - col(t)) * x0 + col(t) * noise
    m = (t + r) / 2
    first = f(z, t, m)
    target = np.where(col(np.arange(12) < 5), (first + f(z - col(t - m) * first, m, r)) / 2,
                      noise - x0)
    want = ((f(z, t, r) - target) ** 2).mean(axis=(1, 2, 3))
    got = objectives.shortcut_loss_per_example(u_test, jnp.asarray(x0), jnp.asarray(noise),
                                               jnp.asarray(t), jnp.asarray(r), 5)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # The target is a constant of the gradient: d loss / d a of a u is 2 (a u - target) u.
    grad = jax.grad(lambda a: jnp.sum(objectives.shortcut_loss_per_example(
        lambda *args: a * u_test(*args), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t),
        jnp.asarray(r), 5)))(1.0)
    np.testing.assert_allclose(grad, np.sum((2 * (f(z, t, r) - target) * f(z, t, r)).mean(
        axis=(1, 2, 3))), rtol=1e-10)


def test_the_shortcut_target_is_exact_for_the_exact_average_velocity():
  """Two exact half steps are the exact whole step: the self-consistency loss of Gaussian data's
  u vanishes (float64), and an u that is off by a term in the step's length does not."""
  with jax.enable_x64(True):
    x0, noise, t, r = gaussian_pairs(3, 1.0)
    loss = lambda u_fn: objectives.shortcut_loss_per_example(u_fn, x0, noise, t, r, 64)
    assert float(jnp.max(loss(exact_u))) < 1e-20
    off = lambda z, t, r: exact_u(z, t, r) * (1 + 0.1 * (t - r) ** 2)[:, None]
    assert float(jnp.min(loss(off))) > 1e-9


# --- consistency training -----------------------------------------------------------------------

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def test_ict_curriculum_levels_and_pair_probabilities_match_numpy():
  """N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / stages); sigma_i = (sigma_min^(1/7) +
  (i - 1) / (N - 1) (sigma_max^(1/7) - sigma_min^(1/7)))^7; p(i) proportional to
  erf((log sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((log sigma_i - P_mean) / (sqrt 2 P_std))
  (Song & Dhariwal 2023, Section 3.3-3.5)."""
  from scipy.special import erf  # pylint: disable=g-import-not-at-top
  num_steps, stages = 8000, 8
  for step, n_want in ((0, 11), (999, 11), (1000, 21), (3500, 81), (7999, 1281)):
    assert float(objectives.ict_levels(jnp.asarray(step), num_steps, stages)) == n_want
  with jax.enable_x64(True):
    for n in (11, 81, 1281):
      sigmas, mass = objectives.ict_pair_mass(jnp.asarray(float(n)), SIGMA_MIN, SIGMA_MAX, -1.1,
                                              2.0)
      i = np.arange(n)
      lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
      want = (lo + i / (n - 1) * (hi - lo)) ** 7
      np.testing.assert_allclose(np.asarray(sigmas)[:n], want, rtol=1e-6)
      cdf = erf((np.log(want) + 1.1) / (np.sqrt(2) * 2.0))
      np.testing.assert_allclose(np.asarray(mass)[:n - 1], cdf[1:] - cdf[:-1], rtol=1e-5,
                                 atol=1e-12)
      assert not np.any(np.asarray(mass)[n - 1:])
  # Draws follow those probabilities: the share of pairs below sigma = 1 (N = 11).
  keys = jax.random.split(jax.random.PRNGKey(0), 20_000)
  t, r = jax.vmap(lambda k: objectives.ict_times(k, jnp.asarray(11.0), SIGMA_MIN, SIGMA_MAX,
                                                 -1.1, 2.0))(keys)
  sigmas = (SIGMA_MIN ** (1 / 7) + np.arange(11) / 10 * (SIGMA_MAX ** (1 / 7) -
                                                         SIGMA_MIN ** (1 / 7))) ** 7
  cdf = erf((np.log(sigmas) + 1.1) / (np.sqrt(2) * 2.0))
  p = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
  below = np.asarray(t) <= 1.0
  assert abs(below.mean() - p[sigmas[1:] <= 1.0].sum()) < 0.015
  nearest = np.abs(np.asarray(r, np.float64)[:, None] / sigmas[None, :-1] - 1).min(axis=1)
  assert nearest.max() < 1e-5  # r is one of the levels


def test_ect_pairs_and_weight_match_numpy():
  """r = max(t (1 - n(t) / q^(stage + 1)), 0), n(t) = 1 + 8 sigmoid(-t), stage =
  floor(step / (K / stages)); w = (t^2 + sigma_data^2) / (t sigma_data)^2 (Geng et al. 2024)."""
  with jax.enable_x64(True):
    t = np.exp(np.random.default_rng(4).normal(-1.1, 2.0, 256))
    for step, stage in ((0, 0), (499, 0), (500, 1), (3999, 7)):
      n = 1 + 8 / (1 + np.exp(t))
      want = np.maximum(t * (1 - n / 2.0 ** (stage + 1)), 0.0)
      got = objectives.ect_times(jnp.asarray(t), jnp.asarray(step), 4000, 8, 2.0)
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    assert float(jnp.mean(objectives.ect_times(jnp.asarray(t), 0, 4000, 8, 2.0) == 0)) > 0.5
    np.testing.assert_allclose(objectives.ect_weight(jnp.asarray(t), 0.5),
                               1 / t ** 2 + 1 / 0.25, rtol=1e-12)


def consistency_fn(x, sigma):
  """The exact consistency function of Gaussian data N(0, S^2 I) on x_t = x + t eps: the
  probability-flow ODE scales x by std, so f(x_t, t) = x_t S / sqrt(S^2 + t^2)."""
  return x * (S / jnp.sqrt(S ** 2 + sigma ** 2))[:, None]


def test_consistency_loss_matches_float64_numpy():
  """w(t, r) (sqrt(|f(x + t z, t) - f(x + r z, r)|^2 + c^2) - c), and f(x, 0) = x at r = 0."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    x0, noise = rng.normal(0, S, (32, 4)), rng.normal(size=(32, 4))
    t = np.exp(rng.normal(-1.1, 2.0, 32))
    r = np.where(np.arange(32) % 4 == 0, 0.0, t * rng.uniform(0.1, 0.9, 32))
    w = rng.uniform(0.5, 2.0, 32)
    c = 0.00054 * math.sqrt(4)
    f = lambda x, s: x * (S / np.sqrt(S ** 2 + s ** 2))[:, None]
    target = np.where((r > 0)[:, None], f(x0 + r[:, None] * noise, r), x0)
    sq = ((f(x0 + t[:, None] * noise, t) - target) ** 2).sum(axis=1)
    want = w * (np.sqrt(sq + c ** 2) - c)
    got = objectives.consistency_loss_per_example(
        consistency_fn, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), jnp.asarray(r),
        jnp.asarray(w), c)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # The target side is a constant of the gradient.
    grad = jax.grad(lambda a: jnp.sum(objectives.consistency_loss_per_example(
        lambda x, s: a * consistency_fn(x, s), jnp.asarray(x0), jnp.asarray(noise),
        jnp.asarray(t), jnp.asarray(r), jnp.asarray(w), c)))(1.0)
    out = f(x0 + t[:, None] * noise, t)
    d_sq = (2 * (out - target) * out).sum(axis=1)
    np.testing.assert_allclose(grad, np.sum(w * d_sq / (2 * np.sqrt(sq + c ** 2))), rtol=1e-10)


@pytest.mark.parametrize('num_steps', [1, 2, 4])
def test_consistency_sampling_is_song_et_al_algorithm_1(num_steps):
  """The `consistency` table run by run_reverse against Algorithm 1 of Song et al. (2023) written
  in NumPy with the same noise: x = T z_0; x0 = f(x, T); then for each next level s:
  x = x0 + s z_i, x0 = f(x, s). With the exact f the samples have the data's spread."""
  with jax.enable_x64(True):
    process = processes.EDM()
    steps = step_tables.build('consistency', process, num_steps=num_steps, spacing='karras')
    assert steps.num_calls == num_steps and abs(steps.t[0] - SIGMA_MAX) < 1e-9
    assert steps.t[-1] > SIGMA_MIN * 10  # no call at the lowest level, where f is the identity
    denoise_fn = lambda x, t: consistency_fn(x, t)
    rng = jax.random.PRNGKey(1)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4096, 2), jnp.float64)
    got = samplers.run_reverse(denoise_fn, steps, x_T, rng, clip_x0=False)
    f = lambda x, s: x * S / np.sqrt(S ** 2 + s ** 2)
    x = np.asarray(x_T) * steps.init_scale
    levels = list(steps.t) + [0.0]
    for i, level in enumerate(levels[:-1]):
      x0 = f(x, level)
      nxt = levels[i + 1]
      x = x0 + nxt * np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x.shape,
                                                  jnp.float64)) if nxt else x0
    np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-12)
    assert abs(float(jnp.std(got)) - S) < 0.02
