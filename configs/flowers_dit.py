"""Oxford Flowers 102 at 64x64 with DiT-B/4 (256 tokens) in bfloat16: `configs/flowers.py`'s
data, process and training, a transformer in place of the U-Net. QK-norm and 2-D RoPE keep
bfloat16 attention logits tame; on a GPU the attention runs in cuDNN's fused kernel.

  python launch.py --config=configs/flowers_dit.py --workdir=/tmp/flowers_dit

DiT-B/4 has 130M parameters (flowers.py's U-Net: 92M). To shard them, their EMA, post-hoc
averages and Adam moments over 4 devices: `--config.parallel.fsdp=4`.
"""

from configs import flowers


def get_config():
  config = flowers.get_config()
  config.model.architecture = 'dit'
  config.model.preset = 'B'
  config.model.patch_size = 4
  config.model.qk_norm = True
  config.model.rope = True
  config.model.dropout = 0.0
  config.training.learning_rate = 1e-4  # DiT's
  config.training.weight_decay = 0.0
  return config
