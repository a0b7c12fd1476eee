"""CUDA checks and GPU numbers, in one script for a GPU machine (results: JSON + markdown under --out).

    python benchmarks/gpu_check.py --data ../shared/data/tinyshakespeare.txt --out gpu_results

Sections (each guarded: one failing section does not stop the others):
  parity     tiny GPT-2 / Llama: CUDA fp32 logits == CPU fp32; bf16 weights close; cached decode == full forward
  sdpa       the training forward runs under the FLASH_ATTENTION-only SDPA backend in bf16 (no mask -> is_causal),
             and masked batched decoding under the memory-efficient backend
  hf         transformers' LlamaForCausalLM (random, saved locally) vs lmstack.load on CUDA: logits
  train      Tiny Shakespeare char GPT: the CPU baby-GPT recipe and nanoGPT's GPU setting (6x6x384, block 256,
             batch 64) on CUDA with bf16 autocast, eager and torch.compile: ms/step, tokens/s, val loss
  generate   a SmolLM2-135M-shaped Llama (random weights: speed does not depend on them), bf16: one stream's
             decode tok/s, and continuous batching at 1/16/64 concurrent requests (aggregate tok/s)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmstack.config import ModelConfig, preset  # noqa: E402
from lmstack.generate import ContinuousBatcher, SamplingParams, stream_steps  # noqa: E402
from lmstack.generate.batching import Request  # noqa: E402
from lmstack.models import Transformer  # noqa: E402
from lmstack.models.kv_cache import KVCache  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a smoke run of the script


def tiny(family: str) -> ModelConfig:
    base = dict(vocab_size=512, block_size=128, n_layer=4, n_head=8, n_embd=256)
    if family == "gpt2":
        return ModelConfig(**base, pos_emb="learned", norm="layernorm", mlp="gelu", bias=True)
    return ModelConfig(**base, n_kv_head=2, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def section_parity(res):
    out = {}
    for fam in ("gpt2", "llama"):
        torch.manual_seed(0)
        m = Transformer(tiny(fam)).eval()
        x = torch.randint(0, 512, (2, 96))
        with torch.no_grad():
            ref = m(x)
            mc = m.to(DEV)
            got = mc(x.to(DEV)).cpu()
            # cached decode on CUDA == full forward
            cache = KVCache.for_model(mc, 2, 96)
            a = mc(x[:, :80].to(DEV), cache=cache, pos=0)
            steps = [mc(x[:, t:t + 1].to(DEV), cache=cache, pos=t) for t in range(80, 96)]
            dec = torch.cat([a] + steps, 1).cpu()
            mb = m.to(torch.bfloat16)
            bf = mb(x.to(DEV)).float().cpu()
        rel = ((bf - ref).norm() / ref.norm()).item()
        out[fam] = {"cuda_fp32_vs_cpu_max_abs": (got - ref).abs().max().item(),
                    "cached_decode_vs_full_max_abs": (dec - got).abs().max().item(),
                    "bf16_vs_fp32_rel": rel}
        assert out[fam]["cuda_fp32_vs_cpu_max_abs"] < 1e-3 and out[fam]["cached_decode_vs_full_max_abs"] < 1e-3
        assert rel < 0.05
    res["parity"] = out


def section_sdpa(res):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    cfg = tiny("llama")
    m = Transformer(cfg).to(DEV).to(torch.bfloat16).train()
    x = torch.randint(0, 512, (4, 128), device=DEV)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss = m(x).float().logsumexp(-1).mean()
        loss.backward()
    m.eval()
    # masked batched decoding through the continuous batcher (padding mask -> not the flash kernel)
    sp = SamplingParams(max_new_tokens=8, temperature=0, stop_at_eos=False)
    b = ContinuousBatcher(m, max_batch=4)
    outs = [[] for _ in range(4)]
    prompts = [[1, 2, 3], list(range(5, 30)), [7], [9] * 12]
    for p, o in zip(prompts, outs):
        b.add(Request(p, sp, on_step=o.append))
    while b.has_work():
        b.step()
    same = all([s.token for s in o] == [s.token for s in stream_steps(m, p, sp)] for p, o in zip(prompts, outs))
    res["sdpa"] = {"flash_only_training_forward_backward": True, "grad_finite": bool(
        all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)),
        "continuous_batching_bf16_equals_alone": same}


def section_hf(res):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        from lmstack.convert.hf import load_hf
        m, _ = load_hf(d)
        m = m.to(DEV).eval()
        hf = hf.to(DEV)
        x = torch.randint(0, 512, (2, 64), device=DEV)
        with torch.no_grad():
            a, b = hf(x).logits, m(x)
        res["hf"] = {"transformers": transformers.__version__, "max_abs_logit_diff": (a - b).abs().max().item()}
        assert res["hf"]["max_abs_logit_diff"] < 1e-3


def section_train(res, data: str, tmp: Path, steps: int):
    from lmstack.train import load_recipe, pretrain
    repo = Path(__file__).resolve().parents[1]
    rows = []
    gpu_cfg = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256", "model.dropout=0.2",
               "batch_size=64", "lr=1e-3", "min_lr=1e-4", "warmup_steps=100", "beta2=0.99", "eval_interval=500",
               "eval_iters=50", "final_eval_windows=200"]
    runs = [("baby-gpt (4x4x128, ctx 64, batch 12)", [], steps, False),
            ("nanoGPT GPU setting (6x6x384, ctx 256, batch 64)", gpu_cfg, steps, False),
            ("nanoGPT GPU setting, torch.compile", gpu_cfg, steps, True)]
    for name, extra, steps, comp in runs:
        cfg = load_recipe(str(repo / "recipes" / "shakespeare-char.yaml"),
                          [f"data_path={data}", f"out_dir={tmp / name.split()[0]}-{comp}", f"device={DEV.type}",
                           "dtype=bfloat16", f"compile={str(comp).lower()}", "progress=false", "threads=0",
                           f"max_steps={steps}", f"decay_steps={steps}", "sample_tokens=0"] + extra)
        t0 = time.perf_counter()
        summary = pretrain(cfg, log=lambda *a, **k: None)
        wall = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
        tps = sorted(r["tokens_per_sec"] for r in metrics if "tokens_per_sec" in r and r["step"] > 20)
        tok_s = tps[len(tps) // 2] if tps else None
        tokens_per_step = cfg.batch_size * int(cfg.model.get("block_size", 64))
        rows.append({"run": name, "steps": steps, "wall_s": round(wall, 1),
                     "median_tokens_per_s": round(tok_s) if tok_s else None,
                     "median_ms_per_step": round(tokens_per_step / tok_s * 1000, 2) if tok_s else None,
                     "val_loss": summary.get("val_loss"), "final_val_loss": summary.get("final_val_loss")})
        res["train"] = rows


def section_generate(res, n_tokens: int = 128):
    torch.manual_seed(0)
    cfg = preset("smollm2-135m")
    m = Transformer(cfg).to(DEV).to(torch.bfloat16).eval()
    prompt = list(range(100, 120))
    sp = SamplingParams(max_new_tokens=n_tokens, temperature=0, stop_at_eos=False)
    for _ in range(2):  # warm-up, then timed
        sync()
        t = time.perf_counter()
        n = len(list(stream_steps(m, prompt, sp)))
        sync()
        dt = time.perf_counter() - t
    out = {"one_stream_tok_s": round(n / dt, 1)}
    for conc in (1, 1, 16, 64):  # the first batch-1 run is a warm-up (masked-attention kernels, allocator)
        b = ContinuousBatcher(m, max_batch=conc)
        cnt = [0]
        for i in range(conc):
            b.add(Request([100 + i] + prompt, sp, on_step=lambda s: cnt.__setitem__(0, cnt[0] + 1)))
        sync()
        t = time.perf_counter()
        while b.has_work():
            b.step()
        sync()
        out[f"continuous_batch_{conc}_aggregate_tok_s"] = round(cnt[0] / (time.perf_counter() - t), 1)
    res["generate"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="tinyshakespeare.txt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="parity,sdpa,hf,generate,train")
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--gen-tokens", type=int, default=128)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "errors": {}}
    tmp = Path(tempfile.mkdtemp())
    for name in a.only.split(","):
        t = time.perf_counter()
        try:
            fn = globals()[f"section_{name}"]
            fn(res, a.data, tmp, a.train_steps) if name == "train" else fn(res, a.gen_tokens) if name == "generate" else fn(res)
            print(f"[{name}] ok in {time.perf_counter() - t:.1f}s: {json.dumps(res.get(name))[:600]}", flush=True)
        except Exception as e:
            res["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"[{name}] FAILED: {e}", flush=True)
            traceback.print_exc()
        (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
