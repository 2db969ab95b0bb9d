"""Editing on the one scan against closed forms: Gaussian data N(0, S) with its exact denoiser.

Inpainting: the known pixels come back exact; the unknown ones follow the Gaussian recursion of
the blended chain (computed here in float64 from the table), whose end is within a small KL of
the conditional Gaussian of the data, closer with RePaint's resampling. Image-to-image: the chain
started part-way down the grid from the noised image lands where the probability-flow ODE from
that level does. Autoguidance with the guide equal to the main model gives the plain samples
(to float32 rounding).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import (editing, generation, parallel, processes, samplers, schedules,
                           step_tables, task as task_lib, timesteps)
from tests.conftest import tiny_image_config, xla_flags

DIM = 4
ROT = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0]
VARIANCES = np.array([0.05, 0.2, 0.5, 1.5])  # eigenvalues of S
COV = ROT @ np.diag(VARIANCES) @ ROT.T
KEEP = np.array([1.0, 1.0, 0.0, 0.0])  # the first two coordinates are known
IMAGE = np.array([0.3, -0.5, 0.0, 0.0])
KNOWN, UNKNOWN = [0, 1], [2, 3]


def ddpm_process():
  return processes.DDPM(schedules.Schedule.from_betas(schedules.get_betas('linear', 200)))


def gain(process, t):
  """The exact denoiser as a matrix: D(x_t) = G x_t, G = S (S + s~^2 I)^-1 / alpha."""
  alpha, sigma = process.alpha_sigma(np.float64(t))
  return ROT @ np.diag(VARIANCES / (VARIANCES + (sigma / alpha) ** 2)) @ ROT.T / alpha


def exact_denoiser(process):
  def denoise_fn(x, t):
    alpha, sigma = process.alpha_sigma(t)
    g = VARIANCES / (VARIANCES + (sigma / alpha)[:, None] ** 2)
    return ((x / alpha[:, None]) @ ROT * g) @ ROT.T
  return denoise_fn


def blended_chain(steps, process):
  """Mean [D] and covariance [D, D] of x after the inpainting table, float64: every row is
  x' = coef_xt x + coef_x0 G x + sigma z, then the known coordinates set to alpha' image +
  sigma' z', then x'' = renoise_scale x' + renoise_sigma z''."""
  m, c = np.zeros(DIM), np.eye(DIM) * steps.init_scale ** 2
  k, eye = np.diag(KEEP), np.eye(DIM)
  for i in range(steps.num_calls):
    step = steps.coef_xt[i] * eye + steps.coef_x0[i, 0] * gain(process, steps.t[i])
    m, c = step @ m, step @ c @ step.T + steps.sigma[i] ** 2 * eye
    m = KEEP * steps.alpha_next[i] * IMAGE + (1 - KEEP) * m
    c = (eye - k) @ c @ (eye - k) + steps.sigma_next[i] ** 2 * k
    m, c = steps.renoise_scale[i] * m, steps.renoise_scale[i] ** 2 * c + (
        steps.renoise_sigma[i] ** 2 * eye)
  return m, c


def conditional():
  """The unknown coordinates given the known: N(S_uk S_kk^-1 x_k, S_uu - S_uk S_kk^-1 S_ku)."""
  s_uk, s_kk = COV[np.ix_(UNKNOWN, KNOWN)], COV[np.ix_(KNOWN, KNOWN)]
  mean = s_uk @ np.linalg.solve(s_kk, IMAGE[KNOWN])
  return mean, COV[np.ix_(UNKNOWN, UNKNOWN)] - s_uk @ np.linalg.solve(s_kk, s_uk.T)


def kl(m1, c1, m0, c0):
  """KL(N(m1, c1) || N(m0, c0))."""
  inv, d = np.linalg.inv(c0), m0 - m1
  return 0.5 * (np.trace(inv @ c1) + d @ inv @ d - len(m0) + np.linalg.slogdet(c0)[1]
                - np.linalg.slogdet(c1)[1])


def test_inpainting_keeps_the_known_pixels_and_follows_the_blended_chain():
  process = ddpm_process()
  steps = editing.for_inpainting(
      step_tables.build('euler_maruyama', process, num_steps=20, spacing='logsnr'), process, 5, 3)
  n = 20000
  with jax.enable_x64(True):
    known = (jnp.broadcast_to(IMAGE, (n, DIM)), jnp.broadcast_to(KEEP, (n, DIM)))
    x = np.asarray(jax.jit(lambda z, rng: samplers.run_reverse(
        exact_denoiser(process), steps, z, rng, clip_x0=False, known=known))(
            jax.random.normal(jax.random.PRNGKey(0), (n, DIM), jnp.float64),
            jax.random.PRNGKey(1)))
  assert np.all(x[:, KNOWN] == IMAGE[KNOWN])  # exact: the last row is at sigma = 0
  mean, cov = blended_chain(steps, process)
  se = np.sqrt(np.diag(cov)[UNKNOWN] / n)
  assert np.all(np.abs(x[:, UNKNOWN].mean(0) - mean[UNKNOWN]) < 4 * se)
  np.testing.assert_allclose(np.cov(x[:, UNKNOWN].T), cov[np.ix_(UNKNOWN, UNKNOWN)], atol=0.01)


def test_inpainting_approaches_the_conditional_gaussian_and_resampling_brings_it_closer():
  process = ddpm_process()
  target = conditional()
  distance = {}
  for name, resample in (('plain', (0, 1)), ('repaint', (5, 5))):
    steps = editing.for_inpainting(
        step_tables.build('euler_maruyama', process, num_steps=50, spacing='logsnr'), process,
        *resample)
    m, c = blended_chain(steps, process)
    distance[name] = kl(m[UNKNOWN], c[np.ix_(UNKNOWN, UNKNOWN)], *target)
  # Measured: 0.016 without resampling, 0.0007 with 5 jumps of 5 repeated 5 times.
  assert distance['plain'] < 0.03
  assert distance['repaint'] < 0.002 and distance['repaint'] < distance['plain'] / 5
  # DDPM's own chain with the paper's (10, 10): the mean within 0.01 of the conditional's.
  steps = editing.for_inpainting(step_tables.build('ddpm', process, num_steps=0), process,
                                     10, 10)
  assert steps.num_calls == 10 * 200
  m, _ = blended_chain(steps, process)
  np.testing.assert_allclose(m[UNKNOWN], target[0], atol=0.01)


def test_resampling_rows_jump_back_to_the_start_of_their_segment():
  process = processes.Flow()
  base = step_tables.build('ddim', process, num_steps=6, spacing='linspace')
  steps = editing.for_inpainting(base, process, 2, 3)
  assert steps.num_calls == 18
  np.testing.assert_array_equal(steps.t[:6], base.t[[0, 1, 0, 1, 0, 1]])
  alpha, sigma, _ = editing.levels(base, process)
  # After row 1 (level 2) back up to level 0: x' = (a0 / a2) x + sqrt(s0^2 - (a0 / a2)^2 s2^2) z.
  up = alpha[0] / alpha[2]
  assert steps.renoise_scale[1] == pytest.approx(up)
  assert steps.renoise_sigma[1] == pytest.approx(math.sqrt(sigma[0] ** 2 - (up * sigma[2]) ** 2))
  assert steps.renoise_sigma[5] == 0 and steps.renoise_scale[5] == 1  # the third run goes on
  for sampler in ('dpm_solver++', 'unipc', 'heun'):
    with pytest.raises(ValueError, match='inpaint_resample'):
      editing.for_inpainting(step_tables.build(sampler, process, num_steps=6,
                                                   spacing='linspace'), process, 2, 3)


@pytest.mark.parametrize('sampler,spacing', [('dpm_solver++', 'logsnr'), ('heun', 'karras')])
def test_image_to_image_converges_to_the_ode_from_its_level(sampler, spacing):
  """Strength 0.5: the last half of the grid, from the image noised to its first level, lands
  where the exact probability-flow ODE from that level does, with the solver's second-order
  error (a quarter for twice the steps)."""
  process = processes.Flow()
  errors = []
  for num_steps in (60, 120, 240):
    full = step_tables.build(sampler, process, num_steps=num_steps, spacing=spacing)
    steps = step_tables.build(sampler, process, num_steps=num_steps, spacing=spacing,
                              strength=0.5)
    kept = timesteps.sampler_times(process, num_steps, spacing)[num_steps // 2:]
    np.testing.assert_array_equal(np.unique(steps.t)[::-1], kept)  # the grid's last half
    assert steps.num_calls < full.num_calls
    with jax.enable_x64(True):
      z = jax.random.normal(jax.random.PRNGKey(0), (256, DIM), jnp.float64)
      start = editing.noised(process, steps.t[0], jnp.asarray(IMAGE), z)
      x = np.asarray(samplers.run_reverse(exact_denoiser(process), steps, z,
                                          jax.random.PRNGKey(1), clip_x0=False, x_start=start))
    alpha, sigma = process.alpha_sigma(np.float64(steps.t[0]))
    # The ODE keeps each eigen-coordinate of y = x / alpha at its standard score: from noise
    # level s~ to 0 it multiplies it by sqrt(lambda / (lambda + s~^2)).
    y = np.asarray(start) / alpha @ ROT
    expected = (y * np.sqrt(VARIANCES / (VARIANCES + (sigma / alpha) ** 2))) @ ROT.T
    errors.append(np.abs(x - expected).max())
  # Measured: dpm_solver++ 2.8e-3, 6.3e-4, 1.5e-4; heun 3.0e-2, 7.3e-3, 1.8e-3.
  assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3 and errors[2] < 2e-3, errors


def test_strength_keeps_a_share_of_the_grid_and_refuses_what_keeps_none():
  grid = np.arange(10)[::-1] * 1.0
  np.testing.assert_array_equal(timesteps.started(grid, 0.3), [2.0, 1.0, 0.0])
  np.testing.assert_array_equal(timesteps.started(grid, 1.0), grid)
  with pytest.raises(ValueError, match='sampling.strength=0.05 keeps none'):
    timesteps.started(grid, 0.05)
  with pytest.raises(ValueError, match=r'must lie in \(0, 1\]'):
    timesteps.started(grid, 1.5)
  ddpm = step_tables.build('ddpm', ddpm_process(), num_steps=0, strength=0.25)
  np.testing.assert_array_equal(ddpm.t, np.arange(50)[::-1])


def test_autoguidance_by_the_model_itself_is_plain_sampling_and_otherwise_the_formula():
  config = tiny_image_config()
  config.sampling.sampler, config.sampling.num_steps = 'ddim', 3
  task = task_lib.create_task(config)
  mesh = parallel.create_mesh(jax.devices()[:1])  # one device: what is tested is the formula
  init = lambda t: jax.jit(lambda rng: task_lib.init_params(t.model, t.info, rng))
  params = init(task)(jax.random.PRNGKey(0))
  plain = generation.make_generate_fn(config, task, mesh)(params, jax.random.PRNGKey(2), 8)
  guided_config = config.copy_and_resolve_references()
  guided_config.sampling.guidance_scale = 2.5
  guided = generation.make_generate_fn(guided_config, task, mesh, guide=(task, 'eps'))
  # Equal up to float32 rounding, not bit for bit: XLA fuses the guided program differently
  # (measured: at most 2.4e-7 apart).
  np.testing.assert_allclose(guided(params, jax.random.PRNGKey(2), 8, guide_params=params),
                             plain, rtol=0, atol=2e-6)
  # Another guide, here of half the width: D = D_guide + w (D - D_guide).
  small_config = config.copy_and_resolve_references()
  small_config.model.channels = 8
  small = task_lib.create_task(small_config)
  small_params = init(small)(jax.random.PRNGKey(4))
  x = jax.random.normal(jax.random.PRNGKey(3), (8,) + tuple(task.info.shape))
  t = jnp.full((8,), 40.0)

  @jax.jit
  def three(x, t):
    main = generation.make_denoise_fn(task, params, None, config)(x, t)
    alone = generation.make_denoise_fn(small, small_params, None, config)(x, t)
    return main, alone, generation.make_denoise_fn(task, params, None, guided_config,
                                                   guided_by=(small, small_params, 'eps'))(x, t)
  d_main, d_guide, got = three(x, t)
  np.testing.assert_allclose(got, d_guide + 2.5 * (d_main - d_guide), rtol=1e-4, atol=1e-5)


def test_inputs_and_masks_are_read_from_files_and_named_shapes(tmp_path):
  rng = np.random.default_rng(0)
  pictures = rng.integers(0, 256, size=(3, 12, 12, 1), dtype=np.uint8)
  folder = tmp_path / 'images'
  folder.mkdir()
  for i, p in enumerate(pictures):
    Image.fromarray(p[..., 0]).save(folder / f'{i}.png')
  np.savez(tmp_path / 'images.npz', images=pictures)
  from_folder = editing.load_images(str(folder), 12, 1, 'sampling.init_image')
  np.testing.assert_array_equal(from_folder, pictures)
  np.testing.assert_array_equal(
      editing.load_images(str(tmp_path / 'images.npz'), 12, 1, 'sampling.init_image'), pictures)
  one = editing.load_images(str(folder / '1.png'), 6, 1, 'sampling.init_image')
  assert one.shape == (1, 6, 6, 1)
  with pytest.raises(FileNotFoundError, match='sampling.inpaint_image'):
    editing.load_images(str(tmp_path / 'missing.png'), 8, 1, 'sampling.inpaint_image')
  center = editing.named_mask('center', 2, 8)
  assert center[0, 2:6, 2:6].all() and center.sum() == 2 * 16
  bottom = editing.named_mask('bottom', 1, 8)
  assert bottom[0, 4:].all() and not bottom[0, :4].any()
  boxes = editing.named_mask('random_boxes', 4, 16, seed=1)
  assert all(0 < m.sum() < 256 for m in boxes)
  white = np.zeros((12, 12), np.uint8)
  white[:, 6:] = 255
  Image.fromarray(white).save(tmp_path / 'mask.png')
  mask = editing.load_mask(str(tmp_path / 'mask.png'), 3, 12)
  assert mask.shape == (3, 12, 12, 1) and mask[:, :, 6:].all() and not mask[:, :, :6].any()
  with pytest.raises(ValueError, match='sampling.inpaint_mask=.middle. is not a file'):
    editing.load_mask('middle', 1, 8)
  assert os.path.exists(folder / '0.png')


@pytest.fixture
def trained_run(tiny_digits_run):
  """(config sampling with DDIM over 4 steps, workdir) of the shared tiny digits run."""
  config, workdir = tiny_digits_run
  config = config.copy_and_resolve_references()
  config.sampling.sampler, config.sampling.num_steps = 'ddim', 4
  config.sampling.num_samples = 5
  return config, workdir


def test_sample_mode_inpaints_edits_and_autoguides_a_trained_run(tmp_path, trained_run):
  from diffusion_jax import config_checks, sampling  # pylint: disable=g-import-not-at-top
  config, workdir = trained_run
  digits = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / 'digits.npz', images=digits)

  inpaint = config.copy_and_resolve_references()
  inpaint.sampling.inpaint_image = str(tmp_path / 'digits.npz')
  inpaint.sampling.inpaint_mask = 'bottom'
  inpaint.sampling.inpaint_resample = (2, 2)
  out = sampling.sample(inpaint, workdir)
  with np.load(out['npz']) as f:
    made, inputs, masks, calls = f['images'], f['inputs'], f['masks'], f['network_calls']
  np.testing.assert_array_equal(inputs, digits[[0, 1, 0, 1, 0]])
  assert masks[:, 4:].all() and not masks[:, :4].any()
  np.testing.assert_array_equal(made[:, :4], inputs[:, :4])  # the known top half, exact
  assert np.all(calls == 8) and os.path.exists(out['inputs'])  # 4 rows in 2 segments, twice

  img2img = config.copy_and_resolve_references()
  img2img.sampling.init_image = str(tmp_path / 'digits.npz')
  img2img.sampling.strength = 0.5
  with np.load(sampling.sample(img2img, workdir)['npz']) as f:
    assert np.all(f['network_calls'] == 2) and f['images'].shape == (5, 8, 8, 1)

  guided = config.copy_and_resolve_references()
  guided.sampling.guide, guided.sampling.guide_checkpoint_step = workdir, 2
  guided.sampling.guidance_scale = 2.0
  with np.load(sampling.sample(guided, workdir)['npz']) as f:
    assert f['images'].shape == (5, 8, 8, 1)
  guided.sampling.guide = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError):
    sampling.sample(guided, workdir)

  both = inpaint.copy_and_resolve_references()
  both.sampling.init_image = inpaint.sampling.inpaint_image
  with pytest.raises(ValueError, match='both set'):
    config_checks.validate(both, 1, mode='sample')
  inpaint.sampling.sampler = 'unipc'
  with pytest.raises(ValueError, match='inpaint_resample repeats steps out of order'):
    sampling.sample(inpaint, workdir)


def test_editing_study_writes_its_tables_and_pictures(tmp_path, trained_run):
  """experiments/editing_study.py end to end at tiny sizes: every part, its rows and files."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from diffusion_jax import sources  # pylint: disable=g-import-not-at-top
  _, workdir = trained_run
  digits, labels = sources.load_in_memory(tiny_image_config())
  np.savez(tmp_path / 'held.npz', images=digits[-6:], labels=labels[-6:])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'study'
  proc = subprocess.run(
      [sys.executable, os.path.join(root, 'experiments', 'editing_study.py'),
       f'--workdir={workdir}', f'--held_out={tmp_path / "held.npz"}', f'--out={out}',
       '--copies=2', '--masks=bottom', '--inpaint_samplers=ddim (eta 1)', '--inpaint_calls=4',
       '--repaint=2,2', '--strengths=0.5', f'--guides={workdir}:2', '--guidance_scales=2',
       '--guided_steps=2'],
      cwd=root, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS=xla_flags(1)))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  with open(out / 'results.json') as f:
    results = json.load(f)
  assert [r['reference'] for r in results['references']] == [
      'held-out images', 'bottom: nearest training image']
  assert results['references'][0]['label_share'] > 0.5  # the judge's classifier on real digits
  assert [(r['resample'], r['calls']) for r in results['inpainting']] == [([0, 1], 4),
                                                                          ([2, 2], 4)]
  assert [(r['strength'], r['calls']) for r in results['image_to_image']] == [(0.5, 2)]
  assert [(r['guide'], r['network_evaluations']) for r in results['autoguidance']] == [
      ('', 2), ('', 4), (f'{workdir}:2', 4)]
  assert all(0.0 <= r['label_share'] <= 1.0
             for r in results['inpainting'] + results['image_to_image'])
  for name in ('inpainting.png', 'sdedit.png'):
    with Image.open(out / name) as im:
      assert im.size[0] >= 6 * 8 * 8  # enlarged 8x8 digits, six to a row at least
  with open(out / 'tables.md') as f:
    assert '| bottom | ddim (eta 1) | jump 2 x 2 | 4 |' in f.read()
