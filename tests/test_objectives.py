"""MeanFlow: its loss against float64 NumPy written from the paper, its identity and its one-step
sampler on Gaussian data, whose average velocity is known in closed form."""

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


def test_the_meanflow_identity_holds_for_the_exact_average_velocity():
  """With the marginal velocity in place of eps - x, the target v - (t - r) du/dt of the exact u
  is u itself (float64): the JVP's directions (v in z, 1 in t, 0 in r) are the paper's."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(0, S, (64, 3)), rng.normal(size=(64, 3))
    t = rng.uniform(0.3, 0.99, 64)
    r = t * rng.uniform(0.0, 0.9, 64)
    loss = lambda u_fn: objectives.meanflow_loss_per_example(
        u_fn, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), jnp.asarray(r),
        weight_power=0.0, guided_v=lambda z, v: exact_v(z, jnp.asarray(t)))
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
    ends = step_tables.row_ends(steps, process)
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
  ends = step_tables.row_ends(steps, process)
  alpha, sigma = process.alpha_sigma(ends)
  np.testing.assert_allclose(alpha, steps.alpha_next, atol=1e-12)
  np.testing.assert_allclose(sigma, steps.sigma_next, atol=1e-12)


def test_meanflow_is_refused_where_the_paper_does_not_define_it():
  objectives.check('meanflow', 'flow', 'flow', True)
  objectives.check('denoise', 'ddpm', 'eps', False)
  with pytest.raises(ValueError, match='diffusion.process=flow'):
    objectives.check('meanflow', 'edm', 'flow', True)
  with pytest.raises(ValueError, match='diffusion.prediction_type=flow'):
    objectives.check('meanflow', 'flow', 'eps', True)
  with pytest.raises(ValueError, match='model.interval_embedding=True'):
    objectives.check('meanflow', 'flow', 'flow', False)
  with pytest.raises(ValueError, match='training.objective'):
    objectives.check('consistency', 'flow', 'flow', True)


def test_trained_in_guidance_mixes_in_the_unconditional_velocity_for_labelled_examples():
  """training.meanflow_guidance w: v -> w v + (1 - w) u(z, t, t | no label) where the label was
  kept, v where it was dropped to the null label."""
  z = jnp.arange(6.0).reshape(3, 2)
  guided = objectives.trained_in_guidance(lambda z: z + 3.0, jnp.array([True, False, True]), 2.0)
  zn = np.asarray(z)
  want = np.stack([2.0 - (zn[0] + 3.0), np.ones(2), 2.0 - (zn[2] + 3.0)])
  np.testing.assert_array_equal(guided(z, jnp.ones((3, 2))), want)
