"""Position settings of Hugging Face decoder configs: RoPE (theta and scaling, as transformers reads
`rope_parameters` / `rope_scaling`) and sliding-window attention (Mistral, Qwen2, per-layer `layer_types`)."""
from __future__ import annotations

from typing import Any

from ..errors import LMStackError


ROPE_KEYS = {  # the rope-scaling fields lmstack keeps per kind (besides the kind itself)
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers-5 `rope_parameters` or the older `rope_theta`/`rope_scaling`.

    scaling is lmstack's rope_scaling dict: {"type": kind, ...the fields of ROPE_KEYS[kind]}, with
    original_max_position_embeddings filled in as transformers does (max_position_embeddings when absent)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type"))
    if scaling is None and kind not in (None, "default"):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ROPE_KEYS:
        raise LMStackError(f"RoPE scaling {kind!r} is not supported (lmstack implements {', '.join(ROPE_KEYS)})")
    if float(scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise LMStackError("partial_rotary_factor != 1 is not supported (lmstack rotates the whole head)")
    max_pos = hf.get("max_position_embeddings", 2048)
    out: dict[str, Any] = {"type": kind}
    for k in ROPE_KEYS[kind]:
        if scaling.get(k) is not None:
            out[k] = scaling[k]
    if kind == "dynamic":  # transformers scales past max_position_embeddings itself
        out["original_max_position_embeddings"] = max_pos
    elif kind in ("yarn", "llama3"):
        out.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings") or max_pos)
    if kind == "yarn" and out.get("factor") is None:
        out["factor"] = max_pos / out["original_max_position_embeddings"]
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k in ROPE_KEYS[kind] and k not in out]
    if missing:
        raise LMStackError(f"RoPE scaling {kind!r} needs {', '.join(missing)} in rope_scaling/rope_parameters")
    for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor"):
        if k in out:
            out[k] = float(out[k])
    if "original_max_position_embeddings" in out:
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return theta, out



def window_settings(hf: dict, mt: str) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) as transformers reads them: `layer_types` when the config lists them
    (sliding_attention / full_attention), else Mistral's sliding_window on every layer, else Qwen2's
    use_sliding_window on the layers from max_window_layers on."""
    window, n = hf.get("sliding_window"), hf["num_hidden_layers"]
    names = hf.get("layer_types")
    if names:
        bad = sorted({t for t in names if t not in ("sliding_attention", "full_attention")})
        if bad:
            raise LMStackError(f"{mt} layer_types {bad} are not supported (only sliding_attention, full_attention)")
        types = ["sliding" if t == "sliding_attention" else "full" for t in names]
        if "sliding" not in types or window is None:
            return None, None
        return int(window), types
    if window is None:
        return None, None
    if mt == "mistral":
        return int(window), None
    if mt == "qwen2" and hf.get("use_sliding_window", False):
        first = hf.get("max_window_layers", n)
        types = ["sliding" if i >= first else "full" for i in range(n)]
        return (int(window), types) if "sliding" in types else (None, None)
    return None, None
