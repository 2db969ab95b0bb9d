"""Figures of the diffusion process, one command each, written as PNGs (needs matplotlib).

  python experiments/figures.py schedules --out=figures/
  python experiments/figures.py forward --out=figures/                 # a digit (offline)
  python experiments/figures.py forward --image=flower.jpg --out=figures/
  python experiments/figures.py reverse --workdir=/tmp/digits --out=figures/
  python experiments/figures.py toy --workdir=/tmp/roll --out=figures/
  python experiments/figures.py weightings --out=figures/

schedules  signal rate sqrt(abar_t) and noise rate sqrt(1 - abar_t) against t/T of the linear,
           cosine and offset-cosine schedules -> schedules.png
forward    q(x_t | x_0) of one real image at several t -> forward.png; the image is a digit by
           default, or --image: a picture file, or an .npz with `images` (--index picks one)
reverse    x_T -> x_0 of generated images from a trained run's EMA params -> reverse.png
toy        Swiss roll (or the run's toy data) to Gaussian -> toy_forward.png, and with a trained
           toy2d --workdir the sampler's way back -> toy_reverse.png
weightings every formulation's loss as one weighting over log-SNR (Kingma & Gao 2023): the
           density of its training times times its weight on ||eps - eps_hat||^2 -> weightings.png
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import matplotlib

matplotlib.use('Agg')  # files only; no display needed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

# Runnable as a script from anywhere in a checkout: the package sits beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax import diffusion, images, processes, schedules, sources
# pylint: enable=g-import-not-at-top,wrong-import-position

SCHEDULES = (('linear', 'linear (DDPM)'), ('cosine', 'cosine (improved DDPM)'),
             ('offset_cosine', 'offset cosine (Keras DDIM)'))
FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # of T: where the forward strips look


def default_times(num_timesteps: int) -> list[int]:
  """Timesteps at FRACTIONS of the way from 0 to T - 1 (0, 50, 100, ... 999 for T = 1000)."""
  return sorted({round(f * (num_timesteps - 1)) for f in FRACTIONS})


# (label, process, schedule, prediction type, loss weighting, training times)
WEIGHTINGS = (
    ('DDPM L_simple (linear, eps)', 'ddpm', 'linear', 'eps', 'none', 'uniform'),
    ('DDPM cosine, eps', 'ddpm', 'cosine', 'eps', 'none', 'uniform'),
    ('DDPM cosine, v', 'ddpm', 'cosine', 'v', 'none', 'uniform'),
    ('Min-SNR-5 (cosine, eps)', 'ddpm', 'cosine', 'eps', 'min_snr', 'uniform'),
    ('sigmoid b=0 (vp cosine, eps)', 'vp', 'cosine', 'eps', 'sigmoid', 'uniform'),
    ('rectified flow, uniform t', 'flow', 'linear', 'flow', 'none', 'uniform'),
    ('SD3 flow, logit-normal t', 'flow', 'linear', 'flow', 'none', 'logit_normal'),
    ('EDM (log-normal sigma, edm)', 'edm', 'linear', 'edm', 'edm', 'lognormal'),
)


def loss_weighting_over_logsnr(process_name: str, schedule: str, prediction_type: str,
                               weighting: str, time_sampling: str, bins: np.ndarray,
                               num: int = 50_000, seed: int = 0) -> np.ndarray:
  """The loss as a weighting over log-SNR lambda: p(lambda) times the mean weight on
  ||eps - eps_hat||^2 in each bin of `bins`, from `num` training times drawn as training draws
  them; normalised to unit area."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.diffusion.process, config.diffusion.schedule = process_name, schedule
  process = processes.from_config(config.diffusion)
  tc = config.training
  mean, std = ((tc.logit_normal_mean, tc.logit_normal_std) if time_sampling == 'logit_normal'
               else (tc.lognormal_mean, tc.lognormal_std))
  keys = jax.random.split(jax.random.PRNGKey(seed), num)
  t = processes.training_times(process, keys, np.arange(num), num, time_sampling, mean=mean,
                               std=std)
  alpha, sigma = (np.asarray(v, np.float64) for v in process.alpha_sigma(t))
  lam = np.log(alpha ** 2 / sigma ** 2)
  weight = np.asarray(diffusion.eps_weight(weighting, prediction_type, alpha, sigma,
                                           min_snr_gamma=config.diffusion.min_snr_gamma,
                                           sigmoid_bias=config.diffusion.sigmoid_bias,
                                           sigma_data=config.diffusion.sigma_data))
  total, _ = np.histogram(lam, bins, weights=weight)
  return total / (total.sum() * np.diff(bins))


def weightings_figure(path: str) -> str:
  """Each of WEIGHTINGS as a normalised weighting over log-SNR, on one axis."""
  bins = np.linspace(-16, 16, 129)
  centres = (bins[1:] + bins[:-1]) / 2
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for label, *setting in WEIGHTINGS:
    density = loss_weighting_over_logsnr(*setting, bins)
    ax.plot(centres, np.where(density > 0, density, np.nan), label=label)
  ax.set_yscale('log')
  ax.set_ylim(1e-4, 5)
  ax.set_xlabel('log-SNR  lambda = log(alpha^2 / sigma^2)')
  ax.set_ylabel('p(lambda) x weight on ||eps - eps_hat||^2 (unit area)')
  ax.set_title('every loss as a weighting over noise levels (Kingma & Gao 2023)')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)
  return path


def schedules_figure(path: str, num_timesteps: int = 1000) -> str:
  """Signal and noise rates of each schedule against t/T, side by side."""
  fig, (ax_s, ax_n) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
  t = np.arange(num_timesteps) / (num_timesteps - 1)
  for name, label in SCHEDULES:
    abar = np.cumprod(1.0 - schedules.get_betas(name, num_timesteps))
    ax_s.plot(t, np.sqrt(abar), label=label)
    ax_n.plot(t, np.sqrt(1.0 - abar), label=label)
  for ax, title in ((ax_s, r'signal rate $\sqrt{\bar\alpha_t}$'),
                    (ax_n, r'noise rate $\sqrt{1-\bar\alpha_t}$')):
    ax.set_title(title)
    ax.set_xlabel('t / T')
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  ax_s.legend()
  return _save(fig, path)


def load_image(image: str | None, index: int = 0, size: int | None = None) -> np.ndarray:
  """uint8 [H, W, C]: digit `index` (no file), image `index` of an .npz, or a picture file.

  size: center-crop and resize to a square of this side (None keeps the image as it is).
  """
  if not image:
    x = sources.digits_images()[0][index]
  elif image.endswith('.npz'):
    x = sources.load_npz(image)[0][index]
  else:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    x = np.asarray(Image.open(image).convert('RGB'))
  return sources.center_crop_resize(x, size) if size else x


def _show(ax, image_uint8: np.ndarray, title: str) -> None:
  gray = image_uint8.shape[-1] == 1
  ax.imshow(image_uint8[..., 0] if gray else image_uint8, cmap='gray' if gray else None,
            vmin=0, vmax=255, interpolation='nearest')
  ax.set_title(title, fontsize=9)
  ax.axis('off')


def forward_figure(path: str, image: np.ndarray, *, schedule: str = 'cosine',
                   num_timesteps: int = 1000, times: Sequence[int] | None = None,
                   seed: int = 0) -> str:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps of one uint8 image [H, W, C], one noise draw."""
  sched = schedules.Schedule.from_betas(schedules.get_betas(schedule, num_timesteps))
  times = [t for t in times if t < num_timesteps] if times else default_times(num_timesteps)
  x0 = np.repeat(images.to_model_range(image)[None], len(times), axis=0)
  noise = np.broadcast_to(np.random.default_rng(seed).standard_normal(image.shape),
                          x0.shape).astype(np.float32)
  x_t = np.asarray(diffusion.q_sample(sched, x0, np.asarray(times, np.int32), noise))
  fig, axes = plt.subplots(1, len(times), figsize=(1.6 * len(times), 2.0))
  for ax, t, x in zip(axes, times, images.to_uint8(x_t)):
    _show(ax, x, f't = {t}')
  fig.suptitle(f'forward process, {schedule} schedule, T = {num_timesteps}', fontsize=10)
  return _save(fig, path)


def _restore(workdir: str, config_file: str | None, num_steps: int | None):
  """(config, task, mesh, EMA params, step) of a trained run."""
  # pylint: disable-next=g-import-not-at-top
  from diffusion_jax import parallel, run_config, task as task_lib
  config = run_config.load_config(workdir, config_file)
  if num_steps:
    config.sampling.num_steps = num_steps
  mesh = parallel.create_mesh()
  task = task_lib.create_task(config)
  params, step = task_lib.restore_ema_params(config, task, mesh, workdir)
  return config, task, mesh, params, step


def _trajectory(workdir: str, config_file: str | None, num_steps: int | None, n: int,
                seed: int):
  """(config, step, trajectory float32 [S + 1, n, ...]) of n samples from x_T to x_0."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import generation  # pylint: disable=g-import-not-at-top
  config, task, mesh, params, step = _restore(workdir, config_file, num_steps)
  generate = generation.make_generate_fn(config, task, mesh, return_trajectory=True)
  _, traj = generate(params, jax.random.PRNGKey(seed), n)
  return config, step, traj


def reverse_figure(path: str, workdir: str, *, config_file: str | None = None,
                   num_steps: int | None = None, num_samples: int = 4,
                   num_frames: int = 10, seed: int = 0) -> str:
  """The sampler's x_T -> x_0 strip of `num_samples` images, one row each."""
  config, step, traj = _trajectory(workdir, config_file, num_steps, num_samples, seed)
  if config.data.source == 'toy2d':
    raise ValueError(f'{workdir} holds a toy2d run: use the `toy` command for points.')
  strip = images.trajectory_strip(config, traj, num_frames)
  fig, ax = plt.subplots(figsize=(min(16, 1.4 * num_frames), 1.5 * num_samples + 0.6))
  _show(ax, strip, f'reverse process x_T -> x_0 ({config.sampling.sampler}, step {step})')
  return _save(fig, path)


def _scatter_row(path: str, frames: Sequence[np.ndarray], titles: Sequence[str],
                 suptitle: str, lim: float = 3.5) -> str:
  fig, axes = plt.subplots(1, len(frames), figsize=(2.2 * len(frames), 2.5))
  for ax, points, title in zip(axes, frames, titles):
    ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect('equal')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
  fig.suptitle(suptitle, fontsize=10)
  return _save(fig, path)


def toy_forward_figure(path: str, points: np.ndarray, *, schedule: str = 'linear',
                       num_timesteps: int = 1000, times: Sequence[int] | None = None,
                       seed: int = 0, name: str = 'swiss_roll') -> str:
  """q(x_t | x_0) of a 2-D point set [N, 2] at several t: the data dissolving into N(0, I)."""
  sched = schedules.Schedule.from_betas(schedules.get_betas(schedule, num_timesteps))
  times = [t for t in times if t < num_timesteps] if times else default_times(num_timesteps)
  rng = np.random.default_rng(seed)
  frames = [np.asarray(diffusion.q_sample(
      sched, points, np.full(len(points), t, np.int32),
      rng.standard_normal(points.shape).astype(np.float32))) for t in times]
  title = f'{name.replace("_", " ")} to Gaussian: forward process ({schedule}, T = {num_timesteps})'
  return _scatter_row(path, frames, [f't = {t}' for t in times], title)


def toy_reverse_figure(path: str, workdir: str, *, config_file: str | None = None,
                       num_steps: int | None = None, num_points: int = 2000,
                       num_frames: int = 8, seed: int = 0) -> str:
  """Points from N(0, I) to the data along a trained toy2d run's sampler trajectory."""
  config, step, traj = _trajectory(workdir, config_file, num_steps, num_points, seed)
  if config.data.source != 'toy2d':
    raise ValueError(f'{workdir} holds a {config.data.source} run, not toy2d: use `reverse`.')
  idx = np.unique(np.linspace(0, traj.shape[0] - 1, num_frames).round().astype(int))
  s = traj.shape[0] - 1
  return _scatter_row(path, [traj[i] for i in idx], [f'step {i}/{s}' for i in idx],
                      f'Gaussian to {config.data.name.replace("_", " ")}: reverse process '
                      f'({config.sampling.sampler}, trained step {step})')


def main(argv: Sequence[str] | None = None) -> list[str]:
  """Parses the command line, writes the figure(s) and returns their paths."""
  parser = argparse.ArgumentParser(prog='python experiments/figures.py',
                                   description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('schedules', help='signal and noise rates of the schedules')
  p.add_argument('--num_timesteps', type=int, default=1000)
  p = sub.add_parser('forward', help='the forward process of one real image')
  p.add_argument('--image', default='', help='picture file or .npz (default: a digit)')
  p.add_argument('--index', type=int, default=0, help='which digit / .npz image')
  p.add_argument('--size', type=int, default=0, help='crop and resize to this side (0: as is)')
  p.add_argument('--schedule', default='cosine', choices=[s for s, _ in SCHEDULES] + ['sigmoid'])
  p.add_argument('--num_timesteps', type=int, default=1000)
  for name in ('reverse', 'toy'):
    p = sub.add_parser(name, help='the reverse process of a trained run' if name == 'reverse'
                       else 'toy 2-D forward (and reverse with --workdir) scatter sequences')
    p.add_argument('--workdir', required=name == 'reverse', default='',
                   help='a trained run (local or gs://); its config.json is used')
    p.add_argument('--config', default=None, help='config file, if workdir has no config.json')
    p.add_argument('--num_steps', type=int, default=0, help='sampler steps (0: the config\'s)')
  sub.add_parser('weightings', help='every formulation\'s loss as a weighting over log-SNR')
  sub.choices['reverse'].add_argument('--num_samples', type=int, default=4)
  sub.choices['toy'].add_argument('--name', default='swiss_roll',
                                  choices=sources.TOY_DATASETS,
                                  help='data without --workdir (else the run\'s)')
  for p in sub.choices.values():
    p.add_argument('--out', default='figures', help='output folder')
    p.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  out = lambda name: os.path.join(args.out, name)

  if args.command == 'schedules':
    paths = [schedules_figure(out('schedules.png'), args.num_timesteps)]
  elif args.command == 'forward':
    image = load_image(args.image, args.index, args.size or None)
    paths = [forward_figure(out('forward.png'), image, schedule=args.schedule,
                            num_timesteps=args.num_timesteps, seed=args.seed)]
  elif args.command == 'weightings':
    paths = [weightings_figure(out('weightings.png'))]
  elif args.command == 'reverse':
    paths = [reverse_figure(out('reverse.png'), args.workdir, config_file=args.config,
                            num_steps=args.num_steps or None, num_samples=args.num_samples,
                            seed=args.seed)]
  else:
    name, schedule, num_timesteps = args.name, 'linear', 1000
    if args.workdir:
      from diffusion_jax import run_config  # pylint: disable=g-import-not-at-top
      config = run_config.load_config(args.workdir, args.config)
      name, schedule = config.data.name, config.diffusion.schedule
      num_timesteps = config.diffusion.num_timesteps
    points = sources.toy_points(name, 2000, args.seed)
    paths = [toy_forward_figure(out('toy_forward.png'), points, schedule=schedule,
                                num_timesteps=num_timesteps, seed=args.seed, name=name)]
    if args.workdir:
      paths.append(toy_reverse_figure(out('toy_reverse.png'), args.workdir,
                                      config_file=args.config, num_steps=args.num_steps or None,
                                      seed=args.seed))
  for path in paths:
    print(path)
  return paths


if __name__ == '__main__':
  main()
