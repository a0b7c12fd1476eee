"""Rotary position embeddings (RoPE) for the Transformer: cos/sin tables in Hugging Face's rotate-half layout and
the scaled variants (linear, dynamic NTK, YaRN, Llama-3), as transformers' ROPE_INIT_FUNCTIONS compute them."""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig


ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")


def rope_scaling_type(cfg: ModelConfig) -> str | None:
    """The RoPE scaling kind of `cfg.rope_scaling` ('type' or 'rope_type'), None when unscaled."""
    s = cfg.rope_scaling or {}
    kind = s.get("type", s.get("rope_type"))
    return None if kind in (None, "default") else kind


def rope_original_length(cfg: ModelConfig) -> int:
    """The context length the model was pretrained at (scaling starts past it); block_size when not given."""
    return int((cfg.rope_scaling or {}).get("original_max_position_embeddings") or cfg.block_size)


def _rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim/2,) float64, cos/sin scale), as transformers' ROPE_INIT_FUNCTIONS compute them.

    linear: positions / factor. dynamic (NTK-aware): the base grows with the current length once it passes the
    original length: base * (factor * L / L0 - (factor - 1)) ** (d / (d - 2)). yarn: per-dimension blend of
    interpolated (/factor) and original frequencies by a linear ramp between the beta_fast/beta_slow correction
    dimensions, with cos/sin scaled by the attention factor (0.1 * mscale * ln(factor) + 1). llama3: low
    frequencies (wavelength > L0/low_freq_factor) / factor, high ones kept, a smooth blend in between."""
    dim, base = cfg.head_dim, float(cfg.rope_theta)
    exps = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (base ** exps)
    kind, s = rope_scaling_type(cfg), cfg.rope_scaling or {}
    if kind is None:
        return inv_freq, 1.0
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"RoPE scaling {kind!r} is not supported; choose one of {', '.join(ROPE_SCALING_TYPES)}")
    factor = float(s["factor"])
    orig = rope_original_length(cfg)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        L = max(int(seq_len or orig), orig)
        base = base * ((factor * L / orig) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exps), 1.0
    if kind == "llama3":
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        low_wavelen, high_wavelen = orig / low, orig / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = get_mscale(factor, m) / get_mscale(factor, m_all) if m and m_all else get_mscale(factor)
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))
    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / factor) * ramp + inv_freq * extrapolation, float(attn)


def rope_frequencies(cfg: ModelConfig, length: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) in float32, Hugging Face's rotate-half layout, with `cfg.rope_scaling`
    applied (linear / dynamic / yarn / llama3). seq_len: the sequence length dynamic scaling adapts to (default:
    the original length, i.e. the unscaled base)."""
    inv_freq, scale = _rope_inv_freq(cfg, seq_len)
    t = torch.arange(length, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).float(), (emb.sin() * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D), or (B, 1, T, D) for per-row positions
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
