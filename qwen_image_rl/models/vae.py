"""Qwen-Image VAE (diffusers `AutoencoderKLQwenImage`), single-image path, in Flax linen.

The reference is a causal 3-D (video) VAE. For one frame with an empty cache it reduces exactly to
a 2-D network (see docs/qwen_image_port.md section 2):

- a causal conv pads time with 2*pT zeros in front, so only the last temporal tap sees the frame:
  it is a 2-D conv with `W[:, :, -1]` and symmetric spatial padding;
- the resamplers' `time_conv` is skipped on the first frame;
- the norm is `x / max(||x||_2, 1e-12) * sqrt(C) * gamma` over channels (not eps-RMSNorm);
- downsampling zero-pads right/bottom by 1 then runs a stride-2 3x3 conv; upsampling repeats pixels
  (nearest-exact x2) then runs a 3x3 conv that halves the channels;
- the mid block is resnet, single-head attention over H*W, resnet.

Everything runs channels-last (NHWC). The full causal kernels [kT, kH, kW, in, out] and the
unused `time_conv` weights are kept as parameters so that a loaded checkpoint saves back
bit-identically (the video path needs them); images only read the last temporal tap.

Submodule names mirror the diffusers state-dict keys (`down_blocks_3` <-> `down_blocks.3`,
`resample_1` <-> `resample.1`), which keeps convert/vae.py a mechanical renaming.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical axes of an NHWC activation: batch over data-parallel axes, channels as the width.
ACT_AXES = ("act_batch", "act_length", None, "act_embed")

# AutoencoderKLQwenImage() defaults, i.e. the released Qwen-Image VAE.
QWEN_IMAGE_LATENTS_MEAN = (
  -0.7571,
  -0.7089,
  -0.9113,
  0.1075,
  -0.1745,
  0.9653,
  -0.1517,
  1.5508,
  0.4134,
  -0.0715,
  0.5517,
  -0.3632,
  -0.1922,
  -0.9497,
  0.2503,
  -0.2921,
)
QWEN_IMAGE_LATENTS_STD = (
  2.8184,
  1.4541,
  2.3275,
  2.6558,
  1.2196,
  1.7708,
  2.6052,
  2.0743,
  3.2687,
  2.1526,
  2.8652,
  1.5579,
  1.6382,
  1.1253,
  2.8251,
  1.9160,
)


def normalize_latents(z, mean, std):
  """Posterior mean -> the DiT's latent space: (z - mean) / std over the channel (last) axis."""
  mean = jnp.asarray(mean, jnp.float32).astype(z.dtype)
  std = jnp.asarray(std, jnp.float32).astype(z.dtype)
  return (z - mean) / std


def denormalize_latents(z, mean, std):
  """Inverse of `normalize_latents`; written as z / (1/std) + mean like the diffusers pipelines."""
  mean = jnp.asarray(mean, jnp.float32).astype(z.dtype)
  inv_std = 1.0 / jnp.asarray(std, jnp.float32)
  return z / inv_std.astype(z.dtype) + mean


def _conv_params(module: nn.Module, kernel_shape: Sequence[int], param_dtype: Dtype):
  """Kernel (..., in, out) and bias (out,), named like torch's weight/bias, with logical axes."""
  lead = (None,) * (len(kernel_shape) - 2)
  kernel = module.param(
    "kernel",
    nn.with_logical_partitioning(nn.initializers.lecun_normal(), lead + ("conv_in", "conv_out")),
    tuple(kernel_shape),
    param_dtype,
  )
  bias = module.param(
    "bias",
    nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    (kernel_shape[-1],),
    param_dtype,
  )
  return kernel, bias


def _conv2d(x, kernel, bias, strides, padding, dtype):
  y = jax.lax.conv_general_dilated(
    x.astype(dtype),
    kernel.astype(dtype),
    window_strides=strides,
    padding=padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  return y + bias.astype(dtype)


class CausalConv3d(nn.Module):
  """QwenImageCausalConv3d applied to one frame: a 2-D conv with the last temporal tap."""

  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kt, kh, kw = self.kernel_size
    kernel, bias = _conv_params(self, (kt, kh, kw, x.shape[-1], self.features), self.param_dtype)
    # Causal time padding puts 2*pT zero frames before the frame, so only tap kT-1 sees it.
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    return _conv2d(x, kernel[-1], bias, (1, 1), padding, self.dtype)


class UnusedTimeConv(nn.Module):
  """The resamplers' temporal conv: declared so checkpoints round-trip, never run for images."""

  in_features: int
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    _conv_params(self, (3, 1, 1, self.in_features, self.features), self.param_dtype)


class Conv2d(nn.Module):
  """torch.nn.Conv2d in NHWC; `padding` is lax-style ((top, bottom), (left, right))."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel, bias = _conv_params(self, (k, k, x.shape[-1], self.features), self.param_dtype)
    return _conv2d(x, kernel, bias, (self.strides, self.strides), self.padding, self.dtype)


class ScaledL2Norm(nn.Module):
  """QwenImageRMS_norm: F.normalize over channels (eps 1e-12 on the norm) * sqrt(C) * gamma."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    gamma = self.param(
      "gamma",
      nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      (channels,),
      self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * (channels**0.5) * gamma.astype(jnp.float32)
    return y.astype(self.dtype)


class ResidualBlock(nn.Module):
  """QwenImageResidualBlock: norm-SiLU-conv twice, plus a 1x1 shortcut when the width changes."""

  in_dim: int
  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.in_dim != self.out_dim:
      shortcut = CausalConv3d(self.out_dim, (1, 1, 1), name="conv_shortcut", **kw)(x)
    else:
      shortcut = x
    h = nn.silu(ScaledL2Norm(name="norm1", **kw)(x))
    h = CausalConv3d(self.out_dim, name="conv1", **kw)(h)
    h = nn.silu(ScaledL2Norm(name="norm2", **kw)(h))
    h = CausalConv3d(self.out_dim, name="conv2", **kw)(h)  # dropout: identity at inference
    return nn.with_logical_constraint(h + shortcut, ACT_AXES)


class AttentionBlock(nn.Module):
  """QwenImageAttentionBlock: one head over all H*W positions, scale 1/sqrt(C), residual."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    pointwise = dict(kernel_size=1, padding=((0, 0), (0, 0)), **kw)
    qkv = Conv2d(3 * c, name="to_qkv", **pointwise)(ScaledL2Norm(name="norm", **kw)(x))
    q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * c), 3, axis=-1)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, h, w, c)
    out = Conv2d(c, name="proj", **pointwise)(out)
    return nn.with_logical_constraint(out + x, ACT_AXES)


class Resample(nn.Module):
  """QwenImageResample for one frame; `*3d` modes only add the (skipped) time_conv weights."""

  dim: int
  mode: str  # downsample2d | downsample3d | upsample2d | upsample3d
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.mode.startswith("downsample"):
      # ZeroPad2d((0, 1, 0, 1)) then a stride-2 valid 3x3 conv.
      x = Conv2d(self.dim, strides=2, padding=((0, 1), (0, 1)), name="resample_1", **kw)(x)
      if self.mode == "downsample3d":
        UnusedTimeConv(self.dim, self.dim, self.param_dtype, name="time_conv")()
    elif self.mode.startswith("upsample"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-exact x2 == repetition
      x = Conv2d(self.dim // 2, name="resample_1", **kw)(x)
      if self.mode == "upsample3d":
        UnusedTimeConv(self.dim, 2 * self.dim, self.param_dtype, name="time_conv")()
    else:
      raise ValueError(f"Resample.mode={self.mode!r}: expected down/upsample 2d/3d")
    return nn.with_logical_constraint(x, ACT_AXES)


class MidBlock(nn.Module):
  """resnet, attention, resnet at the lowest resolution."""

  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResidualBlock(self.dim, self.dim, name="resnets_0", **kw)(x)
    x = AttentionBlock(name="attentions_0", **kw)(x)
    return ResidualBlock(self.dim, self.dim, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
  """QwenImageEncoder3d on one frame; outputs 2*z_dim channels (mean, logvar)."""

  base_dim: int
  out_channels: int
  dim_mult: tuple[int, ...]
  num_res_blocks: int
  temperal_downsample: tuple[bool, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dims = [self.base_dim * u for u in (1,) + tuple(self.dim_mult)]
    x = CausalConv3d(dims[0], name="conv_in", **kw)(x)
    index = 0  # diffusers keeps resnets and resamplers in one flat `down_blocks` list
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(self.num_res_blocks):
        x = ResidualBlock(in_dim, out_dim, name=f"down_blocks_{index}", **kw)(x)
        in_dim, index = out_dim, index + 1
      if level != len(self.dim_mult) - 1:
        mode = "downsample3d" if self.temperal_downsample[level] else "downsample2d"
        x = Resample(out_dim, mode, name=f"down_blocks_{index}", **kw)(x)
        index += 1
    x = MidBlock(dims[-1], name="mid_block", **kw)(x)
    x = nn.silu(ScaledL2Norm(name="norm_out", **kw)(x))
    return CausalConv3d(self.out_channels, name="conv_out", **kw)(x)


class UpBlock(nn.Module):
  """num_res_blocks + 1 resnets, then an optional upsampler that halves the width."""

  in_dim: int
  out_dim: int
  num_res_blocks: int
  upsample_mode: str | None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_dim = self.in_dim
    for j in range(self.num_res_blocks + 1):
      x = ResidualBlock(in_dim, self.out_dim, name=f"resnets_{j}", **kw)(x)
      in_dim = self.out_dim
    if self.upsample_mode is not None:
      x = Resample(self.out_dim, self.upsample_mode, name="upsamplers_0", **kw)(x)
    return x


class Decoder(nn.Module):
  """QwenImageDecoder3d on one frame."""

  base_dim: int
  out_channels: int
  dim_mult: tuple[int, ...]
  num_res_blocks: int
  temperal_upsample: tuple[bool, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mult = tuple(self.dim_mult)
    dims = [self.base_dim * u for u in (mult[-1],) + mult[::-1]]
    x = CausalConv3d(dims[0], name="conv_in", **kw)(z)
    x = MidBlock(dims[0], name="mid_block", **kw)(x)
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        in_dim //= 2  # the previous upsampler halved the width
      mode = None
      if i != len(mult) - 1:
        mode = "upsample3d" if self.temperal_upsample[i] else "upsample2d"
      x = UpBlock(in_dim, out_dim, self.num_res_blocks, mode, name=f"up_blocks_{i}", **kw)(x)
    x = nn.silu(ScaledL2Norm(name="norm_out", **kw)(x))
    return CausalConv3d(self.out_channels, name="conv_out", **kw)(x)


_CONFIG_FIELDS = (
  "base_dim",
  "z_dim",
  "dim_mult",
  "num_res_blocks",
  "attn_scales",
  "temperal_downsample",
  "dropout",
  "input_channels",
  "latents_mean",
  "latents_std",
)


class QwenImageVAE(nn.Module):
  """AutoencoderKLQwenImage for single images, NHWC.

  apply(params, images, method='encode')  images [B,H,W,C] in [-1,1] -> posterior mean [B,h,w,z]
  apply(params, latents, method='decode') un-normalised latents -> images [B,H,W,C] in [-1,1]
  `__call__` (encode then decode) exists so `init` creates every parameter.
  """

  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  dropout: float = 0.0  # kept for config round-trips; inference is deterministic
  input_channels: int = 3
  latents_mean: tuple[float, ...] = QWEN_IMAGE_LATENTS_MEAN
  latents_std: tuple[float, ...] = QWEN_IMAGE_LATENTS_STD
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    self._validate()
    super().__post_init__()

  def _validate(self):
    where = "QwenImageVAE config"
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(
        f"{where}: temperal_downsample has {len(self.temperal_downsample)} entries, "
        f"need len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
      )
    if self.attn_scales:
      # diffusers' encoder calls attention blocks in down_blocks with cache arguments they do
      # not accept (TypeError), and its decoder ignores attn_scales: no reference to match.
      raise ValueError(
        f"{where}: attn_scales={list(self.attn_scales)} is not supported (diffusers "
        "cannot encode with it either); released Qwen-Image VAEs use []"
      )
    for name in ("latents_mean", "latents_std"):
      if len(getattr(self, name)) != self.z_dim:
        raise ValueError(
          f"{where}: {name} has {len(getattr(self, name))} entries, z_dim is {self.z_dim}"
        )
    if self.base_dim <= 0 or self.z_dim <= 0 or self.num_res_blocks < 0:
      raise ValueError(f"{where}: base_dim, z_dim must be positive and num_res_blocks >= 0")

  # ---- config -------------------------------------------------------------------------------

  @classmethod
  def from_config(
    cls, config: Mapping[str, Any], *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
  ) -> QwenImageVAE:
    """Build from a diffusers config.json dict (keys starting with '_' are ignored)."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = set(config) - set(_CONFIG_FIELDS)
    if unknown:
      raise ValueError(
        f"QwenImageVAE.from_config: unknown keys {sorted(unknown)}; known: {list(_CONFIG_FIELDS)}"
      )
    kwargs = {}
    for key, value in config.items():
      kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return cls(**kwargs, dtype=dtype, param_dtype=param_dtype)

  def to_config(self) -> dict[str, Any]:
    """The diffusers config.json fields (without _class_name / _diffusers_version)."""
    out = {}
    for key in _CONFIG_FIELDS:
      value = getattr(self, key)
      out[key] = list(value) if isinstance(value, tuple) else value
    out["temperal_downsample"] = [bool(v) for v in out["temperal_downsample"]]
    return out

  @property
  def spatial_compression_ratio(self) -> int:
    return 2 ** len(self.temperal_downsample)

  def dummy_images(self, batch: int = 1):
    """Smallest input that touches every parameter (for init / eval_shape)."""
    r = self.spatial_compression_ratio
    return jnp.zeros((batch, r, r, self.input_channels), jnp.float32)

  # ---- model ---------------------------------------------------------------------------------

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(
      self.base_dim,
      2 * self.z_dim,
      tuple(self.dim_mult),
      self.num_res_blocks,
      tuple(self.temperal_downsample),
      **kw,
    )
    self.quant_conv = CausalConv3d(2 * self.z_dim, (1, 1, 1), **kw)
    self.post_quant_conv = CausalConv3d(self.z_dim, (1, 1, 1), **kw)
    self.decoder = Decoder(
      self.base_dim,
      self.input_channels,
      tuple(self.dim_mult),
      self.num_res_blocks,
      tuple(self.temperal_downsample)[::-1],
      **kw,
    )

  def _check_input(self, x, channels: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(
        f"QwenImageVAE.{what}: expected NHWC [B, H, W, {channels}], got shape {tuple(x.shape)}"
      )

  def encode_moments(self, images):
    """Posterior (mean, logvar), each [B, h, w, z_dim] float32; logvar clamped to [-30, 20]."""
    self._check_input(images, self.input_channels, "encode")
    x = nn.with_logical_constraint(images.astype(self.dtype), ACT_AXES)
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, images):
    """Images in [-1, 1] -> posterior mode (mean), un-normalised, float32."""
    return self.encode_moments(images)[0]

  def decode(self, latents):
    """Un-normalised latents -> images clipped to [-1, 1], float32."""
    self._check_input(latents, self.z_dim, "decode")
    z = nn.with_logical_constraint(latents.astype(self.dtype), ACT_AXES)
    out = self.decoder(self.post_quant_conv(z)).astype(jnp.float32)
    return jnp.clip(out, -1.0, 1.0)

  def __call__(self, images):
    return self.decode(self.encode(images))


@functools.lru_cache(maxsize=8)
def abstract_variables(model: QwenImageVAE):
  """Boxed ShapeDtypeStructs of `model.init` (logical axes included), with no compute. Cached
  per config (modules compare by their fields): tracing the VAE's init takes about 0.2 s and
  every load traces it twice. Treat the result as read-only."""
  return jax.eval_shape(model.init, jax.random.key(0), model.dummy_images())


def init_params(model: QwenImageVAE, rng) -> dict:
  """Random parameters {'params': ...}, unboxed."""
  return nn.meta.unbox(model.init(rng, model.dummy_images()))


__all__ = [
  "QWEN_IMAGE_LATENTS_MEAN",
  "QWEN_IMAGE_LATENTS_STD",
  "QwenImageVAE",
  "abstract_variables",
  "denormalize_latents",
  "init_params",
  "normalize_latents",
]
