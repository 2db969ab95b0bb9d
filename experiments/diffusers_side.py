"""The PyTorch side of the benchmark: diffusers' UNet2DModel built like our U-Net, or its
DiTTransformer2DModel built like our DiT, and their steps.

The train step does the same work as ours (`diffusion_jax.train.train_step`): draw timesteps and
noise, noise the batch, predict the noise, MSE loss, backward, global-norm clipping, AdamW, and
an EMA update of the parameters. Needs the `bench` extra (torch, diffusers).
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers import DPMSolverMultistepScheduler
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import DiTTransformer2DModel
from diffusers import UNet2DModel

from diffusion_jax import models


def build_unet(config) -> UNet2DModel:
  """diffusers' UNet2DModel with the architecture of `config.model` (the bench U-Net's layout).

  Levels with attention use AttnDownBlock2D / AttnUpBlock2D; diffusers' default attention head
  width of 8 matches `model.head_dim = 8`.
  """
  mc, size = config.model, config.data.image_size
  if mc.scale_shift or mc.head_dim != 8:
    raise ValueError('the diffusers comparison needs model.scale_shift=False and head_dim=8.')
  widths = tuple(mc.channels * m for m in mc.channel_mult)
  attn = [size // 2**i in mc.attention_resolutions for i in range(len(widths))]
  down = tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in attn)
  up = tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn))
  return UNet2DModel(sample_size=size, in_channels=config.data.channels,
                     out_channels=config.data.channels, block_out_channels=widths,
                     layers_per_block=mc.num_res_blocks, down_block_types=down,
                     up_block_types=up, attention_head_dim=8, norm_eps=1e-6,
                     norm_num_groups=mc.num_groups, dropout=mc.dropout)


def build_dit(config) -> DiTTransformer2DModel:
  """diffusers' DiTTransformer2DModel with the architecture of `config.model` (a DiT without
  QK-norm or RoPE, MLP ratio 4). It is class-conditional only (adaLN-Zero on the sum of the
  noise-level and label embeddings), so the config must be too."""
  mc, data = config.model, config.data
  if not data.class_conditional or not data.num_classes:
    raise ValueError('diffusers\' DiTTransformer2DModel always takes labels: set '
                     'data.class_conditional=True and data.num_classes (configs/bench_dit.py).')
  if mc.qk_norm or mc.rope or mc.mlp_ratio != 4:
    raise ValueError('the diffusers comparison needs model.qk_norm=False, model.rope=False and '
                     'model.mlp_ratio=4 (the reference DiT).')
  hidden, depth, heads = models.dit_size(mc)
  return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads,
                               in_channels=data.channels, out_channels=data.channels,
                               num_layers=depth, sample_size=data.image_size,
                               patch_size=mc.patch_size, num_embeds_ada_norm=data.num_classes,
                               norm_eps=1e-6)


def build_network(config) -> torch.nn.Module:
  return build_dit(config) if config.model.architecture == 'dit' else build_unet(config)


# diffusers' DiT gives every block its own copy of the noise-level MLP and label table (the
# reference shares one; diffusers' conversion script copies its weights into each block).
_BLOCK_EMBEDDING_COPY = re.compile(r'transformer_blocks\.[1-9][0-9]*\.norm1\.emb\.')


def parameter_count(model: torch.nn.Module) -> int:
  """Parameters, with the per-block copies of diffusers' DiT embeddings counted once: the
  architecture's count (they add depth - 1 small [B, D] MLP calls per step, no other work)."""
  return sum(p.numel() for name, p in model.named_parameters()
             if not _BLOCK_EMBEDDING_COPY.match(name))


class TorchBench:
  """diffusers' U-Net with AdamW and an EMA, on a fixed batch; each call blocks until done.

  Args:
    config: the benchmark config (model, training, data groups).
    images: float32 [B, H, W, C] in [-1, 1], the same batch the JAX side uses.
    alphas_cumprod: float64 [T], the noise schedule.
  """

  def __init__(self, config, images: np.ndarray, alphas_cumprod: np.ndarray, seed: int = 0,
               bfloat16: bool = False):
    torch.manual_seed(seed)
    tc = config.training
    # bfloat16: the steps run under torch's CPU autocast (parameters and optimizer stay float32).
    self.autocast = ((lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if bfloat16
                     else contextlib.nullcontext)
    self.model = build_network(config).train()
    # A DiT always takes labels: the "no label" row, as our side's unlabelled calls use.
    self.labels = (torch.full((len(images),), config.data.num_classes)
                   if config.model.architecture == 'dit' else None)
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    self.opt = torch.optim.AdamW(self.params, lr=tc.learning_rate, betas=(tc.b1, tc.b2),
                                 eps=tc.eps, weight_decay=tc.weight_decay)
    self.grad_clip, self.ema_decay = tc.grad_clip, tc.ema_decay
    self.x0 = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    self.alphas_cumprod = np.asarray(alphas_cumprod, np.float64)
    self.abar = torch.from_numpy(alphas_cumprod.astype(np.float32))
    self.t_fixed = torch.randint(0, len(self.abar), (len(self.x0),))
    self.x_fixed = torch.randn_like(self.x0)

  def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network's output for x [B, C, H, W] at timesteps t (scalar or [B])."""
    if self.labels is None:
      return self.model(x, t).sample
    t = t.expand(len(x)) if t.dim() == 0 else t
    return self.model(x, timestep=t, class_labels=self.labels[:len(x)]).sample

  def train_step(self) -> float:
    """One optimizer step; returns the loss."""
    b = len(self.x0)
    t = torch.randint(0, len(self.abar), (b,))
    noise = torch.randn_like(self.x0)
    a = self.abar[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * self.x0 + (1 - a).sqrt() * noise
    with self.autocast():
      prediction = self.predict(x_t, t)
    loss = torch.nn.functional.mse_loss(prediction.float(), noise)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip:
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)  # pylint: disable=protected-access
    return loss.item()

  def forward(self) -> np.ndarray:
    """One noise prediction on the fixed noisy batch, without autograd."""
    with torch.inference_mode(), self.autocast():
      return self.predict(self.x_fixed, self.t_fixed).float().numpy()

  def sampler(self, name: str, num_steps: int, clip_x0: float) -> Callable[[], np.ndarray]:
    """sample() -> float32 [B, C, H, W]: one batch drawn with diffusers' own scheduler loop.

    `name` 'ddim': DDIMScheduler, eta 0, `leading` spacing (ours `uniform`), x0 clipped to
    [-clip_x0, clip_x0]; 'dpm_solver++': DPMSolverMultistepScheduler, DPM-Solver++(2M),
    `linspace` spacing, lower orders at the end. Both on this schedule's betas; 'flow_euler':
    FlowMatchEulerDiscreteScheduler (shift 1), the Euler step of a flow in t from 1 down, the
    network read as the velocity. All under `torch.inference_mode()`, one network call per step.
    """
    abar = self.alphas_cumprod
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    common = dict(num_train_timesteps=len(abar), trained_betas=betas)
    if name == 'ddim':
      scheduler = DDIMScheduler(**common, clip_sample=clip_x0 > 0, clip_sample_range=clip_x0,
                                set_alpha_to_one=False, timestep_spacing='leading')
    elif name == 'dpm_solver++':
      scheduler = DPMSolverMultistepScheduler(**common, algorithm_type='dpmsolver++',
                                              solver_order=2, timestep_spacing='linspace')
    elif name == 'flow_euler':
      scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=len(abar), shift=1.0)
    else:
      raise ValueError(f'no diffusers loop for sampler {name!r}: ddim, dpm_solver++ or '
                       'flow_euler.')
    generator = torch.Generator().manual_seed(0)

    def sample() -> np.ndarray:
      scheduler.set_timesteps(num_steps)
      x = torch.randn(self.x0.shape, generator=generator)
      self.model.eval()
      with torch.inference_mode(), self.autocast():
        for t in scheduler.timesteps:
          x = scheduler.step(self.predict(x, t).float(), t, x).prev_sample
      self.model.train()
      return x.numpy()

    return sample


def matmul_flops_per_s(n: int = 4096, repeats: int = 5) -> float:
  """float32 FLOP/s of an n x n matmul (median of `repeats`)."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    times.append(time.perf_counter() - start)
  return 2 * n**3 / float(np.median(times))
