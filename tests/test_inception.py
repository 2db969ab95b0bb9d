"""Tests for the FID Inception network and its weight loading, on random weights and fake files.

Fake checkpoints are written byte for byte in torch.save's formats (pickle opcodes by hand, no
torch needed). Params come from the flax param shapes filled with lecun-normal noise, as flax's
init would: compiling `InceptionV3.init` itself takes ~30 s on a small CPU.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax.metrics import inception_weights
from diffusion_jax.metrics.inception import InceptionV3, make_feature_fn, resize_bilinear
from diffusion_jax.metrics.inception_weights import (FID_WEIGHTS_URL, load_inception_params,
                                                     save_params_npz, state_dict_to_params,
                                                     torch_state_dict_shapes)
from diffusion_jax.metrics.torch_checkpoint import (LEGACY_MAGIC, LEGACY_PROTOCOL,
                                                    read_torch_state_dict)

# ---- torch.save, written by hand --------------------------------------------------------------

_STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
                  np.dtype(np.int64): 'LongStorage'}


def _str(s: str) -> bytes:
  b = s.encode()
  return b'X' + struct.pack('<I', len(b)) + b  # BINUNICODE


def _int(i: int) -> bytes:
  if -2**31 <= i < 2**31:
    return b'J' + struct.pack('<i', i)  # BININT
  raw = i.to_bytes((i.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(raw)]) + raw  # LONG1


def _tuple(items) -> bytes:
  return b'(' + b''.join(items) + b't'  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
  return b'c' + f'{module}\n{name}\n'.encode()


def _ordered_dict(pairs) -> bytes:
  return _global('collections', 'OrderedDict') + b')R' + (
      b'(' + b''.join(k + v for k, v in pairs) + b'u' if pairs else b'')  # SETITEMS


def _state_dict_pickle(tensors, legacy: bool) -> bytes:
  """The data.pkl torch.save writes: OrderedDict of _rebuild_tensor_v2(storage pid, ...)."""
  pairs = []
  for key, (storage_key, offset, shape, strides, dtype, numel) in tensors.items():
    pid = [_str('storage'), _global('torch', _STORAGE_NAMES[np.dtype(dtype)]), _str(storage_key),
           _str('cpu'), _int(numel)] + ([b'N'] if legacy else [])  # legacy: no storage view
    args = [_tuple(pid) + b'Q', _int(offset), _tuple(map(_int, shape)),  # BINPERSID
            _tuple(map(_int, strides)), b'\x89', _ordered_dict([])]  # requires_grad False
    pairs.append((_str(key), _global('torch._utils', '_rebuild_tensor_v2') + _tuple(args) + b'R'))
  return b'\x80\x02' + _ordered_dict(pairs) + b'.'


def _layout(arrays):
  """One storage per tensor, like a state_dict; returns (tensor table, storages)."""
  tensors, storages = {}, {}
  for i, (key, a) in enumerate(arrays.items()):
    a = np.array(a, order='C')  # ascontiguousarray would make 0-d arrays 1-d
    strides = tuple(s // a.itemsize for s in a.strides)
    tensors[key] = (str(i), 0, a.shape, strides, a.dtype, a.size)
    storages[str(i)] = a.ravel()
  return tensors, storages


def write_torch_zip(path, arrays) -> None:
  tensors, storages = _layout(arrays)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr('archive/data.pkl', _state_dict_pickle(tensors, legacy=False))
    zf.writestr('archive/byteorder', 'little')
    for key, flat in storages.items():
      zf.writestr(f'archive/data/{key}', flat.astype(flat.dtype.newbyteorder('<')).tobytes())
    zf.writestr('archive/version', '3\n')


def write_torch_legacy(path, tensors, storages) -> None:
  with open(path, 'wb') as f:
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, dict(protocol_version=LEGACY_PROTOCOL,
                                                       little_endian=True)):
      f.write(pickle.dumps(header, protocol=2))
    f.write(_state_dict_pickle(tensors, legacy=True))
    f.write(pickle.dumps(list(storages), protocol=2))
    for flat in storages.values():
      f.write(struct.pack('<q', flat.size) + flat.astype(flat.dtype.newbyteorder('<')).tobytes())


def fake_fid_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Every key of pytorch-fid's checkpoint at its shape, random values (BN variances > 0)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in torch_state_dict_shapes().items():
    if key.endswith('running_var'):
      sd[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      sd[key] = rng.normal(0, 0.1, shape).astype(np.float32)
    if key.endswith('bn.running_var'):  # what torch >= 0.4.1 adds per BatchNorm
      sd[key.replace('running_var', 'num_batches_tracked')] = np.array(0, np.int64)
  sd['fc.weight'] = rng.normal(size=(1008, 2048)).astype(np.float32)
  sd['fc.bias'] = np.zeros(1008, np.float32)
  return sd


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def init_shapes():
  """InceptionV3's param tree as flax init builds it (shapes only: no compile, no compute)."""
  return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope='module')
def random_params(init_shapes):
  rng = np.random.default_rng(0)
  def fill(path, leaf):
    if path[-1].key == 'bias':
      return np.zeros(leaf.shape, np.float32)
    fan_in = np.prod(leaf.shape[:-1])  # flax's default lecun_normal kernel init
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, init_shapes['params'])


def _flat_shapes(tree):
  return {k: (tuple(v.shape), np.dtype(v.dtype))
          for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


# ---- network ----------------------------------------------------------------------------------

def test_features_shape_finite_nonnegative_deterministic(random_params):
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  features = make_feature_fn(random_params)
  first, second = np.asarray(features(images)), np.asarray(features(images))
  assert first.shape == (2, 2048) and first.dtype == np.float32
  assert np.isfinite(first).all()
  assert (first >= 0).all() and (first > 0).any()  # mean of ReLU outputs
  np.testing.assert_array_equal(first, second)
  assert not np.allclose(first[0], first[1])  # different images, different features


def test_bad_inputs_name_the_fix(random_params):
  variables = {'params': random_params}
  with pytest.raises(ValueError, match='127.5'):
    InceptionV3().apply(variables, jnp.zeros((1, 8, 8, 3), jnp.uint8))
  with pytest.raises(ValueError, match='3 channels'):
    InceptionV3().apply(variables, jnp.zeros((1, 8, 8, 1)))


def _torch_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """Row i: the weights torch's bilinear (align_corners=False, no antialias) gives output i."""
  src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), i0), 1 - (src - i0))
  np.add.at(w, (np.arange(n_out), i1), src - i0)
  return w


@pytest.mark.parametrize('height,width', [(5, 7), (40, 33)])  # up- and downsampling
def test_resize_matches_torch_bilinear(height, width):
  x = np.random.default_rng(2).normal(size=(2, height, width, 3)).astype(np.float32)
  expected = np.einsum('oh,bhwc,pw->bopc', _torch_bilinear_matrix(height, 13), x,
                       _torch_bilinear_matrix(width, 13))
  np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(x), 13)), expected,
                             atol=1e-5)


# ---- the state_dict <-> param tree mapping -------------------------------------------------------

def test_architecture_table_matches_flax_init(init_shapes):
  from_table = {k: (s, np.dtype(np.float32))
                for k, s in inception_weights.flax_param_shapes().items()}
  assert _flat_shapes(init_shapes['params']) == from_table
  assert len(inception_weights.conv_layers()) == 94


def test_full_fake_state_dict_loads_into_exactly_the_init_tree(init_shapes):
  sd = fake_fid_state_dict()
  params = state_dict_to_params(sd)
  assert _flat_shapes(params) == _flat_shapes(init_shapes['params'])
  # BatchNorm folding, checked on one layer: relu(bn(conv(x))) == relu(conv'(x) + b').
  g, b = sd['Mixed_6b.branch7x7_2.bn.weight'], sd['Mixed_6b.branch7x7_2.bn.bias']
  m, v = sd['Mixed_6b.branch7x7_2.bn.running_mean'], sd['Mixed_6b.branch7x7_2.bn.running_var']
  scale = g / np.sqrt(v + 1e-3)
  conv = params['Mixed_6b']['branch7x7_2']['conv']
  np.testing.assert_allclose(
      conv['kernel'], sd['Mixed_6b.branch7x7_2.conv.weight'].transpose(2, 3, 1, 0) * scale,
      rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(conv['bias'], b - m * scale, rtol=1e-5, atol=1e-6)


def test_state_dict_mismatches_are_reported():
  sd = fake_fid_state_dict()
  del sd['Mixed_7c.branch_pool.conv.weight']
  sd['AuxLogits.fc.weight'] = np.zeros((1008, 768), np.float32)
  sd['Conv2d_1a_3x3.bn.bias'] = np.zeros(31, np.float32)
  with pytest.raises(ValueError) as info:
    state_dict_to_params(sd)
  message = str(info.value)
  for fragment in ('Mixed_7c.branch_pool.conv.weight', 'AuxLogits.fc.weight',
                   'Conv2d_1a_3x3.bn.bias', FID_WEIGHTS_URL):
    assert fragment in message


# ---- reading torch.save files ------------------------------------------------------------------

_SMALL = {'a.weight': np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5.5,
          'a.bias': np.array([1.5, -2.0], np.float32),
          'b.double': np.linspace(0, 1, 5),
          'bn.num_batches_tracked': np.array(7, np.int64)}


def test_reads_zip_format(tmp_path):
  write_torch_zip(tmp_path / 'small.pth', _SMALL)
  got = read_torch_state_dict(tmp_path / 'small.pth')
  assert list(got) == list(_SMALL)
  for key, value in _SMALL.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape
    np.testing.assert_array_equal(got[key], value)


def test_reads_legacy_format_with_offsets_and_strides(tmp_path):
  # Two tensors in one storage, one of them transposed (non-contiguous), as torch can save them.
  base = np.arange(20, dtype=np.float32)
  tensors = {'t': ('140001', 2, (3, 4), (1, 3), np.float32, 20),  # base[2:14].reshape(4,3).T
             'u': ('140001', 14, (6,), (1,), np.float32, 20),
             'n': ('140002', 0, (), (), np.int64, 1)}
  storages = {'140001': base, '140002': np.array([3], np.int64)}
  write_torch_legacy(tmp_path / 'legacy.pth', tensors, storages)
  got = read_torch_state_dict(tmp_path / 'legacy.pth')
  np.testing.assert_array_equal(got['t'], base[2:14].reshape(4, 3).T)
  np.testing.assert_array_equal(got['u'], base[14:20])
  assert got['n'].shape == () and got['n'] == 3


def test_rejects_files_that_are_not_state_dicts(tmp_path):
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'not a checkpoint at all')
  with pytest.raises(ValueError, match='not a readable torch.save file'):
    read_torch_state_dict(garbage)
  evil = tmp_path / 'evil.pth'
  with zipfile.ZipFile(evil, 'w') as zf:  # a pickle that would call os.system
    zf.writestr('archive/data.pkl', b'\x80\x02' + _global('os', 'system') + _tuple([_str('ls')])
                + b'R.')
  with pytest.raises(ValueError, match='os.system'):
    read_torch_state_dict(evil)


# ---- load_inception_params ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def fake_pth(tmp_path_factory):
  path = tmp_path_factory.mktemp('weights') / 'pt_inception-fake.pth'
  sd = fake_fid_state_dict(seed=3)
  write_torch_zip(path, sd)
  return path, sd


def test_loads_pth_and_npz_to_the_same_params(fake_pth, tmp_path):
  path, sd = fake_pth
  prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
  params = load_inception_params(path, sha256_prefix=prefix)
  expected = traverse_util.flatten_dict(state_dict_to_params(sd), sep='/')
  flat = traverse_util.flatten_dict(params, sep='/')
  assert flat.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(flat[key], expected[key])
  inception_weights.main(['--convert', str(path), str(tmp_path / 'w.npz'), '--skip-sha256'])
  from_npz = traverse_util.flatten_dict(load_inception_params(tmp_path / 'w.npz'), sep='/')
  for key in expected:
    np.testing.assert_array_equal(from_npz[key], expected[key])


def test_wrong_checksum_points_to_the_download(fake_pth):
  with pytest.raises(ValueError, match='sha256') as info:
    load_inception_params(fake_pth[0])  # default: the real file's prefix 6726825d
  assert FID_WEIGHTS_URL in str(info.value)


def test_missing_or_wrong_files_point_to_the_download(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    load_inception_params(tmp_path / 'pt_inception-2015-12-05-6726825d.pth')
  assert FID_WEIGHTS_URL in str(info.value)
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'\x00' * 64)
  with pytest.raises(ValueError) as info:
    load_inception_params(garbage, sha256_prefix=None)
  assert FID_WEIGHTS_URL in str(info.value)
  partial = tmp_path / 'partial.npz'
  save_params_npz(partial, {'Conv2d_1a_3x3': {'conv': {'kernel': np.zeros((3, 3, 3, 32))}}})
  with pytest.raises(ValueError, match='missing') as info:
    load_inception_params(partial)
  assert FID_WEIGHTS_URL in str(info.value)


# ---- against pytorch-fid itself, where torch is installed (it is not a dependency) ---------------

def test_matches_pytorch_fid_network(tmp_path, monkeypatch):
  torch = pytest.importorskip('torch')
  pi = pytest.importorskip('pytorch_fid.inception')
  torch.manual_seed(0)
  net = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  patches = {'Mixed_5b': pi.FIDInceptionA(192, 32), 'Mixed_5c': pi.FIDInceptionA(256, 64),
             'Mixed_5d': pi.FIDInceptionA(288, 64), 'Mixed_6b': pi.FIDInceptionC(768, 128),
             'Mixed_6c': pi.FIDInceptionC(768, 160), 'Mixed_6d': pi.FIDInceptionC(768, 160),
             'Mixed_6e': pi.FIDInceptionC(768, 192), 'Mixed_7b': pi.FIDInceptionE_1(1280),
             'Mixed_7c': pi.FIDInceptionE_2(2048)}
  for name, block in patches.items():
    setattr(net, name, block)  # what pi.fid_inception_v3 does, minus the download
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.normal_(m.weight, 0, (2.0 / m.weight[0].numel()) ** 0.5)
      if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics exercise the folding
        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
  torch.save(net.state_dict(), tmp_path / 'w.pth')
  monkeypatch.setattr(pi, 'load_state_dict_from_url', lambda *a, **k: net.state_dict())
  reference = pi.InceptionV3([3]).eval()
  x = np.random.default_rng(0).uniform(-1, 1, (2, 40, 40, 3)).astype(np.float32)
  with torch.no_grad():  # pytorch-fid takes [0, 1] NCHW
    expected = reference(torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
  got = np.asarray(make_feature_fn(load_inception_params(tmp_path / 'w.pth',
                                                         sha256_prefix=None))(x))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
