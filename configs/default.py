"""Every config field with its default. Variant configs start from here and override a few.

  python launch.py --config=configs/default.py --workdir=/tmp/run
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.data = data = ml_collections.ConfigDict()
  data.source = 'tfds'  # tfds | folder | npz | digits | toy2d
  data.name = 'oxford_flowers102'  # TFDS name, or for toy2d: swiss_roll | moons | s_curve
  data.splits = 'train+validation+test'  # TFDS split expression used for training
  data.eval_splits = 'test'  # held-out split for bits/dim (TFDS); npz/folder use data.path
  data.data_dir = ''  # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  data.download = True  # let TFDS download a missing data set (needs network)
  data.path = ''  # folder of images, or .npz file with `images` (and optional `labels`)
  data.image_size = 64  # images are center-cropped and resized to this square size
  data.channels = 3  # 3 for RGB sources, 1 for digits; ignored for toy2d
  data.random_flip = True  # random horizontal flip
  data.class_conditional = False  # feed labels to the model (classifier-free guidance)
  data.num_classes = 0  # number of labels when class_conditional (0: read from the source)
  data.num_points = 100_000  # toy2d: size of the fixed point set
  data.num_threads = 0  # threads reading batches ahead (0: one per CPU, at most 8)
  data.num_workers = 0  # worker processes reading batches (0: the threads of this process)
  data.prefetch = 2  # batches prefetched to the devices
  data.check_images = True  # folder: decode every image once at start, skip (and name) bad ones

  config.model = model = ml_collections.ConfigDict()
  model.architecture = 'unet'  # unet | dit | mlp | autoencoder (latent diffusion's first stage)
  model.channels = 128  # base width of the U-Net
  model.channel_mult = (1, 2, 2, 2)  # width multiplier of each resolution level
  model.num_res_blocks = 2  # ResBlocks per down level (the up path has one more)
  model.attention_resolutions = (16,)  # feature-map sizes that get self-attention
  model.num_heads = 1  # attention heads (U-Net, DDPM: 1, used when head_dim is 0; DiT)
  model.head_dim = 0  # fixed width per attention head (0: use num_heads)
  model.dropout = 0.1  # dropout inside ResBlocks
  model.scale_shift = False  # time embedding as GroupNorm scale/shift (ADM) instead of added
  model.num_groups = 32  # GroupNorm groups
  model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (params stay float32)
  model.attention = 'auto'  # kernel: auto (cudnn on GPU, lean on CPU) | xla | cudnn | lean
  model.hidden = 128  # mlp, dit: width
  model.num_layers = 4  # mlp: residual blocks; dit: transformer blocks
  model.preset = ''  # dit: S | B | L | XL sets hidden, num_layers, num_heads ('': those fields)
  model.patch_size = 2  # dit: side of the square patches (tokens = (image_size / patch_size)^2)
  model.mlp_ratio = 4.0  # dit: MLP width / hidden width
  model.qk_norm = False  # dit: RMSNorm of each head's queries and keys
  model.rope = False  # dit: 2-D rotary position embedding instead of the sin-cos table
  model.interval_embedding = False  # a second time input, the step's length (meanflow needs it)

  config.autoencoder = ae = ml_collections.ConfigDict()  # model.architecture=autoencoder
  ae.block_out_channels = (64, 128, 256)  # width of each level; downsampling 2^(levels - 1)
  ae.layers_per_block = 2  # ResNet blocks per encoder level (the decoder has one more)
  ae.latent_channels = 4  # channels of the latent
  ae.num_groups = 32  # GroupNorm groups
  ae.loss = 'l1'  # reconstruction loss: l1 | l2 (per pixel)
  ae.kl_weight = 1e-6  # KL to N(0, I), per pixel as latent diffusion weighs it

  config.latent = latent = ml_collections.ConfigDict()  # latent diffusion on an autoencoder
  latent.autoencoder = ''  # an autoencoder run's workdir or a diffusers AutoencoderKL folder
  latent.autoencoder_step = -1  # its checkpoint (-1: the newest; training records the one used)
  latent.scale = 0.0  # latents times this (0: the weights' scaling_factor, or 1 / the data's std)
  latent.fingerprint = ''  # SHA-256 of the autoencoder's parameters (training records it)

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.process = 'ddpm'  # ddpm (discrete, T steps) | vp | flow | edm (continuous time)
  # ddpm: linear | cosine | offset_cosine | sigmoid; vp: cosine | linear
  diffusion.schedule = 'linear'
  diffusion.schedule_kwargs = ''  # the schedule's own parameters, e.g. 'beta_end=0.01' (linear)
  diffusion.num_timesteps = 1000  # T of the ddpm process
  diffusion.sigma_min = 0.002  # edm: the smallest noise level
  diffusion.sigma_max = 80.0  # edm: the largest noise level
  diffusion.sigma_data = 0.5  # edm preconditioning and weighting: the data's standard deviation
  diffusion.prediction_type = 'eps'  # eps | x0 | v | flow (eps - x0) | edm (preconditioned F)
  diffusion.loss = 'l2'  # l2 | l1
  diffusion.loss_weighting = 'none'  # none | min_snr | sigmoid | edm (a weight on the data error)
  diffusion.min_snr_gamma = 5.0  # loss_weighting=min_snr: min(SNR, gamma)
  diffusion.sigmoid_bias = 0.0  # loss_weighting=sigmoid: b of SNR sigmoid(b - log SNR)

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global batch, split over every device of every host
  training.num_steps = 500_000  # total optimizer steps
  training.learning_rate = 2e-4  # peak learning rate
  training.lr_schedule = 'constant'  # constant | cosine (after warm-up)
  training.warmup_steps = 5000  # linear learning-rate warm-up
  training.b1 = 0.9  # AdamW beta1
  training.b2 = 0.999  # AdamW beta2
  training.eps = 1e-8  # AdamW epsilon
  training.weight_decay = 0.0  # AdamW decoupled weight decay
  training.grad_clip = 1.0  # global-norm clipping (0: off)
  training.ema_decay = 0.9999  # EMA of the parameters, used for sampling
  training.ema_warmup = True  # ramp the EMA decay as min(decay, (1 + step) / (10 + step))
  training.phema_sigma_rels = ()  # post-hoc EMA: widths of the tracked averages (EDM2: 0.05, 0.10)
  training.phema_snapshot_every = 5000  # post-hoc EMA: steps between snapshots of the averages
  training.phema_dtype = 'float32'  # post-hoc EMA: dtype of the snapshots (float32 | bfloat16)
  training.label_dropout = 0.1  # class_conditional: drop labels to "none" for guidance
  training.seed = 0  # initialisation, data order and noise
  training.time_sampling = 'uniform'  # uniform | stratified | logit_normal (SD3) | lognormal (EDM)
  training.logit_normal_mean = 0.0  # logit_normal: log sigma~ ~ N(mean, std)
  training.logit_normal_std = 1.0
  training.lognormal_mean = -1.2  # lognormal: EDM's P_mean
  training.lognormal_std = 1.2  # lognormal: EDM's P_std
  training.time_shift = 1.0  # SD3's shift of the training times (sigma~ multiplied by it)
  training.steps_per_call = 1  # train steps per compiled call (lax.scan)
  training.objective = 'denoise'  # denoise | meanflow | shortcut | consistency (few-step sampling)
  training.meanflow_ratio = 0.25  # meanflow: share of examples with r != t (the rest: r = t)
  training.meanflow_weight_power = 1.0  # meanflow: p of the adaptive weight 1/(|err|^2 + c)^p
  training.meanflow_guidance = 1.0  # meanflow, class_conditional: guidance scale trained in
  training.shortcut_ratio = 0.25  # shortcut: share of each batch that is self-consistency
  training.shortcut_max_steps = 128  # shortcut: the finest step is 1 / this (a power of 2)
  training.consistency_schedule = 'ict'  # consistency: pairs of levels: ict | ect (from init_from)
  training.consistency_stages = 8  # consistency: curriculum stages over training.num_steps
  training.consistency_q = 2.0  # consistency, ect: t - r shrinks by q each stage
  training.consistency_huber_c = 0.00054  # consistency: pseudo-Huber c per sqrt(dimensions)
  training.init_from = ''  # a run's workdir: start from its EMA parameters (fine-tuning, ECT)
  training.log_every = 100  # metrics to stdout and TensorBoard
  training.sample_every = 5000  # sample grid from the EMA params (0: off)
  training.checkpoint_every = 5000  # Orbax checkpoint
  training.keep_checkpoints = 3  # how many checkpoints to keep

  config.sampling = sampling = ml_collections.ConfigDict()
  # ddpm | ddim | dpm_solver++ | unipc | euler | heun | edm | euler_maruyama | adaptive (ODE)
  sampling.sampler = 'ddim'
  sampling.num_steps = 50  # steps: network calls, but heun / edm make 2 num_steps - 1 (ddpm: all T)
  sampling.eta = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM-like
  sampling.solver_order = 2  # dpm_solver++ / unipc: 1, 2 or 3 (1 is DDIM with eta 0)
  sampling.stochastic = False  # dpm_solver++ only: its SDE form, fresh noise at every step
  sampling.spacing = 'uniform'  # uniform (=leading on ddpm), linspace, karras, logsnr, shifted;
                                # ddpm only: trailing, quadratic
  sampling.time_shift = 1.0  # spacing=shifted: SD3's shift (3.0 in SD3)
  sampling.rtol = 1e-3  # adaptive: relative tolerance of the ODE solve's step control
  sampling.atol = 1e-3  # adaptive: absolute tolerance (on x / alpha)
  sampling.s_churn = 0.0  # edm sampler: S_churn (EDM Algorithm 2)
  sampling.s_tmin = 0.0  # edm sampler: churn only for sigma~ in [s_tmin, s_tmax]
  sampling.s_tmax = float('inf')
  sampling.s_noise = 1.0  # edm sampler: S_noise
  sampling.variance = 'small'  # DDPM: small (posterior) | large (beta)
  sampling.clip_x0 = 1.0  # clip predicted x0 to [-c, c] (1: images in [-1, 1]; 0: no clipping)
  sampling.guidance_scale = 1.0  # classifier-free guidance (1: plain conditional)
  sampling.guidance_interval = ()  # (lo, hi): guide only where lo < sigma~ <= hi (): everywhere
  sampling.label = -1  # class of the samples (-1: cycle through the classes)
  sampling.guide = ''  # autoguidance: workdir of a weaker model of the same data (guidance_scale)
  sampling.guide_checkpoint_step = -1  # the guide's checkpoint (-1: latest)
  sampling.inpaint_image = ''  # inpainting (--mode=sample): images to complete (PNG, folder, .npz)
  sampling.inpaint_mask = 'center'  # PNG/.npz (white: fill) or center, left, right, top, bottom,
  #                                   random_boxes
  sampling.inpaint_resample = (0, 1)  # RePaint's (jump, repeats); (0, 1): none; paper: (10, 10)
  sampling.init_image = ''  # image-to-image (SDEdit): images to start from (PNG, folder, .npz)
  sampling.strength = 0.6  # image-to-image: share of the sampler's steps run (1: plain sampling)
  sampling.num_samples = 64  # --mode=sample: how many to generate
  sampling.batch_size = 64  # global batch for generation
  sampling.seed = 0  # noise for generation
  sampling.checkpoint_step = -1  # which checkpoint to sample from (-1: latest)
  sampling.ema_sigma_rel = 0.0  # post-hoc EMA of this width (0: the EMA of training.ema_decay)
  sampling.trajectory = False  # also write the x_T -> x_0 strip
  sampling.preview_samples = 16  # size of the grid written during training
  sampling.preview_sampler = 'ddim'  # sampler of that grid (with sampling.spacing, .solver_order)
  sampling.preview_steps = 25  # its network calls

  config.parallel = parallel = ml_collections.ConfigDict()
  parallel.fsdp = 1  # devices sharing (not replicating) the training state; must divide the count

  config.eval = ev = ml_collections.ConfigDict()
  ev.num_samples = 10_000  # generated samples for FID/KID
  ev.inception_path = ''  # pt_inception-2015-12-05-6726825d.pth or a converted .npz
  ev.reference_stats = ''  # cached .npz of data-set Inception statistics ('' = compute)
  ev.num_reference = 10_000  # data images used for reference statistics
  ev.bpd_num_examples = 0  # held-out images for bits/dim (0: skip)
  ev.bpd_batch_size = 16  # batch for bits/dim (T network calls per batch)
  ev.ode_bpd = True  # bits/dim through the probability-flow ODE (ddpm: besides the bound)
  ev.ode_probes = 1  # Hutchinson probes per example (0: the exact divergence; 2-D data: exact)
  ev.ode_probe_kind = 'rademacher'  # rademacher | gaussian
  ev.ode_rtol = 1e-3  # the likelihood ODE's tolerances (converged on digits: docs/likelihoods.md)
  ev.ode_atol = 1e-3
  ev.inception_batch_size = 200  # images per Inception-v3 call (split over the local devices)
  ev.kid_subset_size = 1000  # KID: rows per random subset (capped at the sample count)
  ev.kid_num_subsets = 100  # KID: random subsets averaged
  ev.psnr_num_examples = 1000  # autoencoder runs: held-out images for the reconstruction PSNR

  return config
