"""Weights of the FID Inception-v3: pytorch-fid's release file, read without torch, or a .npz.

The architecture is written out here a second time, as the table of torchvision's BasicConv2d
layers (`conv_layers`), independently of the flax modules in `inception`, so that a test can
check that every tensor of the real checkpoint finds its place. Each BasicConv2d's inference
BatchNorm (eps 0.001) is folded into its conv. Nothing is downloaded at run time:

  python -m diffusion_jax.metrics.inception_weights --convert in.pth out.npz
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import zipfile
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax.metrics.torch_checkpoint import read_torch_state_dict

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
FID_WEIGHTS_SHA256_PREFIX = '6726825d'  # torch-hub convention: the name carries the sha256 prefix
BN_EPS = 1e-3  # torchvision's BasicConv2d BatchNorm eps
_WHERE = (f'Get pytorch-fid\'s FID Inception weights from {FID_WEIGHTS_URL} (nothing is '
          'downloaded at run time) and pass that .pth, or a .npz made from it with '
          '`python -m diffusion_jax.metrics.inception_weights --convert <in.pth> <out.npz>`.')
Params = dict[str, Any]


# The torchvision state_dict, written from the architecture

def _block_convs(kind: str, cin: int, arg: int = 0) -> list[tuple[str, int, int, Any]]:
  """(name, in, out, kernel) of each BasicConv2d in one torchvision Inception block."""
  if kind == 'A':
    return [('branch1x1', cin, 64, 1), ('branch5x5_1', cin, 48, 1), ('branch5x5_2', 48, 64, 5),
            ('branch3x3dbl_1', cin, 64, 1), ('branch3x3dbl_2', 64, 96, 3),
            ('branch3x3dbl_3', 96, 96, 3), ('branch_pool', cin, arg, 1)]
  if kind == 'B':
    return [('branch3x3', cin, 384, 3), ('branch3x3dbl_1', cin, 64, 1),
            ('branch3x3dbl_2', 64, 96, 3), ('branch3x3dbl_3', 96, 96, 3)]
  if kind == 'C':
    c7 = arg
    return [('branch1x1', cin, 192, 1), ('branch7x7_1', cin, c7, 1),
            ('branch7x7_2', c7, c7, (1, 7)), ('branch7x7_3', c7, 192, (7, 1)),
            ('branch7x7dbl_1', cin, c7, 1), ('branch7x7dbl_2', c7, c7, (7, 1)),
            ('branch7x7dbl_3', c7, c7, (1, 7)), ('branch7x7dbl_4', c7, c7, (7, 1)),
            ('branch7x7dbl_5', c7, 192, (1, 7)), ('branch_pool', cin, 192, 1)]
  if kind == 'D':
    return [('branch3x3_1', cin, 192, 1), ('branch3x3_2', 192, 320, 3),
            ('branch7x7x3_1', cin, 192, 1), ('branch7x7x3_2', 192, 192, (1, 7)),
            ('branch7x7x3_3', 192, 192, (7, 1)), ('branch7x7x3_4', 192, 192, 3)]
  return [('branch1x1', cin, 320, 1), ('branch3x3_1', cin, 384, 1),  # 'E'
          ('branch3x3_2a', 384, 384, (1, 3)), ('branch3x3_2b', 384, 384, (3, 1)),
          ('branch3x3dbl_1', cin, 448, 1), ('branch3x3dbl_2', 448, 384, 3),
          ('branch3x3dbl_3a', 384, 384, (1, 3)), ('branch3x3dbl_3b', 384, 384, (3, 1)),
          ('branch_pool', cin, 192, 1)]


def conv_layers() -> list[tuple[str, int, int, tuple[int, int]]]:
  """(torch module path, in channels, out channels, (kh, kw)) of all 94 BasicConv2d layers.

  Written from torchvision's Inception3 independently of the flax modules above, so a test can
  check that the two agree and hence that every tensor of the real checkpoint finds its place.
  """
  stem = [('Conv2d_1a_3x3', 3, 32, 3), ('Conv2d_2a_3x3', 32, 32, 3),
          ('Conv2d_2b_3x3', 32, 64, 3), ('Conv2d_3b_1x1', 64, 80, 1),
          ('Conv2d_4a_3x3', 80, 192, 3)]
  blocks = [('Mixed_5b', 'A', 192, 32), ('Mixed_5c', 'A', 256, 64), ('Mixed_5d', 'A', 288, 64),
            ('Mixed_6a', 'B', 288, 0), ('Mixed_6b', 'C', 768, 128), ('Mixed_6c', 'C', 768, 160),
            ('Mixed_6d', 'C', 768, 160), ('Mixed_6e', 'C', 768, 192), ('Mixed_7a', 'D', 768, 0),
            ('Mixed_7b', 'E', 1280, 0), ('Mixed_7c', 'E', 2048, 0)]
  layers = list(stem)
  for block, kind, cin, arg in blocks:
    layers += [(f'{block}.{name}', i, o, k) for name, i, o, k in _block_convs(kind, cin, arg)]
  return [(n, i, o, (k, k) if isinstance(k, int) else k) for n, i, o, k in layers]


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Every tensor the FID network needs from the pytorch-fid state_dict, with its shape."""
  shapes = {}
  for name, cin, cout, (kh, kw) in conv_layers():
    shapes[f'{name}.conv.weight'] = (cout, cin, kh, kw)
    for stat in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{name}.bn.{stat}'] = (cout,)
  return shapes


def flax_param_shapes() -> dict[str, tuple[int, ...]]:
  """The flat ('/'-joined) shapes of `InceptionV3`'s params, as derived from `conv_layers`."""
  shapes = {}
  for name, cin, cout, (kh, kw) in conv_layers():
    prefix = name.replace('.', '/') + '/conv/'
    shapes[prefix + 'kernel'], shapes[prefix + 'bias'] = (kh, kw, cin, cout), (cout,)
  return shapes


def _unused_torch_key(key: str) -> bool:
  # The 1008-way classifier comes after pool3; num_batches_tracked only matters for training.
  return key in ('fc.weight', 'fc.bias') or key.endswith('.bn.num_batches_tracked')


def _mismatch_error(what: str, missing, unexpected, wrong) -> ValueError:
  parts = [f'{label} ({len(keys)}): {", ".join(keys[:5])}{", ..." if len(keys) > 5 else ""}'
           for label, keys in (('missing', missing), ('unexpected', unexpected),
                               ('wrong shape', wrong)) if keys]
  return ValueError(f'{what} is not the FID Inception-v3: {"; ".join(parts)}. {_WHERE}')


def state_dict_to_params(state_dict: Mapping[str, np.ndarray]) -> Params:
  """pytorch-fid's state_dict (torch names, OIHW) -> `InceptionV3` params (HWIO, BN folded).

  Every needed tensor must be present at its shape and nothing unknown may be left over, so a
  checkpoint of another network fails loudly instead of giving meaningless features.
  """
  expected = torch_state_dict_shapes()
  missing = sorted(k for k in expected if k not in state_dict)
  unexpected = sorted(k for k in state_dict if k not in expected and not _unused_torch_key(k))
  wrong = [f'{k} {tuple(np.shape(state_dict[k]))} != {shape}' for k, shape in expected.items()
           if k in state_dict and tuple(np.shape(state_dict[k])) != shape]
  if missing or unexpected or wrong:
    raise _mismatch_error('the state_dict', missing, unexpected, wrong)
  flat = {}
  for name, *_ in conv_layers():
    weight, bias, mean, var, kernel = (
        np.asarray(state_dict[f'{name}.{suffix}'], np.float64)
        for suffix in ('bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var', 'conv.weight'))
    scale = weight / np.sqrt(var + BN_EPS)
    prefix = name.replace('.', '/') + '/conv/'
    flat[prefix + 'kernel'] = (kernel.transpose(2, 3, 1, 0) * scale).astype(np.float32)
    flat[prefix + 'bias'] = (bias - mean * scale).astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


# Loading, saving, converting

def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _is_npz(path: pathlib.Path) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
  return bool(names) and all(n.endswith('.npy') for n in names)


def save_params_npz(path: str | pathlib.Path, params: Params) -> None:
  """Writes the params as one array per '/'-joined path (`Mixed_5b/branch1x1/conv/kernel`)."""
  flat = traverse_util.flatten_dict(params, sep='/')
  with open(path, 'wb') as f:  # a file object: np.savez would append '.npz' to a bare name
    np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_params_npz(path: str | pathlib.Path) -> Params:
  """Params written by `save_params_npz`, checked against the architecture."""
  with np.load(path) as z:
    flat = {k: z[k] for k in z.files}
  expected = flax_param_shapes()
  missing = sorted(k for k in expected if k not in flat)
  unexpected = sorted(k for k in flat if k not in expected)
  wrong = [f'{k} {flat[k].shape} != {s}' for k, s in expected.items()
           if k in flat and flat[k].shape != s]
  if missing or unexpected or wrong:
    raise _mismatch_error(str(path), missing, unexpected, wrong)
  return traverse_util.unflatten_dict(flat, sep='/')


def load_inception_params(path: str | pathlib.Path, *,
                          sha256_prefix: str | None = FID_WEIGHTS_SHA256_PREFIX) -> Params:
  """`InceptionV3` params from pytorch-fid's .pth or from a .npz converted from it.

  The file type is read from its content, not its name. A .pth must have a sha256 starting with
  `sha256_prefix` (None skips the check, for a checkpoint you trust); a .npz is checked for
  the right arrays at the right shapes.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No FID Inception weights at {path}. {_WHERE}')
  if _is_npz(path):
    return load_params_npz(path)
  if sha256_prefix is not None:
    digest = _sha256(path)
    if not digest.startswith(sha256_prefix.lower()):
      raise ValueError(f'{path} has sha256 {digest[:16]}..., but pytorch-fid\'s weights start '
                       f'with {sha256_prefix}: the file is corrupt or another checkpoint. {_WHERE}')
  try:
    state_dict = read_torch_state_dict(path)
  except ValueError as e:
    raise ValueError(f'{e}. {_WHERE}') from e
  return state_dict_to_params(state_dict)


def convert_pth_to_npz(pth_path: str | pathlib.Path, npz_path: str | pathlib.Path, *,
                       sha256_prefix: str | None = FID_WEIGHTS_SHA256_PREFIX) -> None:
  """pytorch-fid's .pth -> a .npz of the (BN-folded) flax params, loadable without the .pth."""
  save_params_npz(npz_path, load_inception_params(pth_path, sha256_prefix=sha256_prefix))


def main(argv: list[str] | None = None) -> None:
  """The converter CLI: `python -m diffusion_jax.metrics.inception_weights --convert IN OUT`."""
  parser = argparse.ArgumentParser(
      prog='python -m diffusion_jax.metrics.inception_weights',
      description=f'Convert pytorch-fid\'s FID Inception weights ({FID_WEIGHTS_URL}) to .npz.')
  parser.add_argument('--convert', nargs=2, metavar=('IN_PTH', 'OUT_NPZ'), required=True)
  parser.add_argument('--skip-sha256', action='store_true',
                      help='do not check the sha256 prefix of the .pth')
  args = parser.parse_args(argv)
  src, dst = args.convert
  convert_pth_to_npz(src, dst, sha256_prefix=None if args.skip_sha256 else
                     FID_WEIGHTS_SHA256_PREFIX)
  print(f'wrote {dst}')


if __name__ == '__main__':
  main()
