"""Agreement with lm-evaluation-harness: its `hf` model and lmstack's eval on the same tiny Hugging Face Llama
directory and the same fixture data (an MMLU subject, 1-shot from the dev split, with lm-eval's own MMLU template;
and HellaSwag-style text choices where acc_norm matters) give identical acc / acc_norm and per-choice
log-likelihoods equal to float rounding. Offline: the data are local JSON files read by `datasets`' json builder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

import lmstack  # noqa: E402
from lmstack.eval import evaluate, resolve_tasks  # noqa: E402
from lmstack.tokenizer import train_bpe  # noqa: E402

from conftest import make_text  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "eval"

MMLU_YAML = """task: lmstack_mmlu_astronomy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: 1
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about astronomy.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""

QUERY_YAML = """task: lmstack_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    T = transformers
    texts = [make_text(300)] + [f.read_text() for f in sorted(FIX.rglob("*.*")) if f.parent.name != "bad"] * 2
    tok = train_bpe(texts, vocab_size=400, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    m = T.LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # spread the logits: choices differ clearly
    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    m.save_pretrained(d, safe_serialization=True)
    T.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.hf.to_str()), eos_token="<|endoftext|>",
                              bos_token="<|endoftext|>").save_pretrained(d)
    return d


def _write_data(tmp: Path) -> Path:
    inc = tmp / "tasks"
    inc.mkdir()
    for split in ("test", "dev"):  # MMLU CSV -> the HF cais/mmlu layout
        rows = []
        for doc in resolve_tasks(f"mmlu_astronomy={FIX / 'mmlu'}")[0].docs if split == "test" else \
                resolve_tasks(f"mmlu_astronomy={FIX / 'mmlu'}")[0].fewshot_docs:
            lines = doc.context.split("\n")
            rows.append({"question": lines[0], "choices": [ln[3:] for ln in lines[1:5]], "answer": doc.gold})
        (tmp / f"mmlu_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (inc / "mmlu.yaml").write_text(MMLU_YAML.format(test=tmp / "mmlu_test.jsonl", dev=tmp / "mmlu_dev.jsonl"))
    for name, spec in (("hellaswag", "hellaswag"), ("arc", "arc_easy"), ("tqa", "truthfulqa_mc1")):
        task = resolve_tasks(spec, FIX)[0]
        rows = [{"query": d.context, "choices": d.choices, "gold": d.gold} for d in task.docs]
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (inc / f"{name}.yaml").write_text(QUERY_YAML.format(name=name, test=tmp / f"{name}.jsonl"))
    return inc


@pytest.mark.slow
def test_lm_eval_hf_and_lmstack_agree(hf_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    inc = _write_data(tmp_path)
    names = ["lmstack_mmlu_astronomy", "lmstack_hellaswag", "lmstack_arc", "lmstack_tqa"]
    ref = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=names,
                          task_manager=TaskManager(include_path=str(inc)), device="cpu", batch_size=1,
                          log_samples=True)
    lm = lmstack.load(hf_dir)
    ours = evaluate(lm, f"mmlu_astronomy={FIX / 'mmlu'}", shots=1, log_samples=True)
    ours0 = evaluate(lm, "hellaswag,arc_easy,truthfulqa_mc1", data_dir=FIX, shots=0, log_samples=True)
    pairs = [("lmstack_mmlu_astronomy", ours, "mmlu_astronomy"), ("lmstack_hellaswag", ours0, "hellaswag"),
             ("lmstack_arc", ours0, "arc_easy"), ("lmstack_tqa", ours0, "truthfulqa_mc1")]
    for ref_name, res, name in pairs:
        r = ref["results"][ref_name]
        got = res["results"][name]["metrics"]
        assert got["acc"]["value"] == r["acc,none"], name
        assert got["acc_norm"]["value"] == r["acc_norm,none"], name
        ref_samples = sorted(ref["samples"][ref_name], key=lambda x: x["doc_id"])
        assert len(ref_samples) == len(res["samples"][name]) == got["acc"]["n"] > 0
        for s_ref, s in zip(ref_samples, res["samples"][name]):
            lls = [float(x[0][0]) for x in s_ref["resps"]]
            assert s["loglikelihoods"] == pytest.approx(lls, abs=1e-4), name
            args = s_ref["arguments"]
            first = args[0] if isinstance(args, list) else next(iter(args.values()))
            ctx = first[0] if isinstance(first, (list, tuple)) else first["arg_0"]
            assert ctx == s["context"], name  # the same prompt text, few-shot example included
        print(name, got["acc"]["value"], got["acc_norm"]["value"])


def test_mmlu_dev_questions_built_from_lm_eval(tmp_path):
    from lmstack.eval.download import build_mmlu_from_lm_eval
    root = build_mmlu_from_lm_eval(tmp_path)
    tasks = resolve_tasks(f"mmlu={root}")
    assert len(tasks) >= 50 and sum(len(t.docs) for t in tasks) >= 250
    doc = next(t for t in tasks if t.name == "mmlu_astronomy").docs[0]
    assert doc.context.startswith("Where do most short-period comets come from") and doc.gold == 0


@pytest.mark.slow
def test_lm_eval_local_completions_against_lmstack_serve(hf_dir, tmp_path):
    """lm-eval's `local-completions` model (the OpenAI completions client it uses for any server) against a live
    `lmstack serve` of the same weights: the same accuracies and log-likelihoods as lmstack's own evaluation."""
    pytest.importorskip("uvicorn")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from conftest import start_server
    from lmstack.serve import create_app
    inc = _write_data(tmp_path)
    lm = lmstack.load(hf_dir)
    srv, th, url = start_server(create_app(lm, "tiny-llama", max_batch=8))
    try:
        names = ["lmstack_mmlu_astronomy", "lmstack_hellaswag"]
        ref = simple_evaluate(model="local-completions", tasks=names, task_manager=TaskManager(include_path=str(inc)),
                              model_args=f"model=tiny-llama,base_url={url}/v1/completions,tokenizer={hf_dir},"
                                         "tokenizer_backend=huggingface,num_concurrent=4,max_retries=1",
                              log_samples=True)
    finally:
        srv.should_exit = True
        th.join(timeout=10)
    ours = evaluate(lm, f"mmlu_astronomy={FIX / 'mmlu'}", shots=1, log_samples=True)
    ours0 = evaluate(lm, "hellaswag", data_dir=FIX, shots=0, log_samples=True)
    for ref_name, res, name in [("lmstack_mmlu_astronomy", ours, "mmlu_astronomy"), ("lmstack_hellaswag", ours0,
                                                                                      "hellaswag")]:
        r, got = ref["results"][ref_name], res["results"][name]["metrics"]
        assert got["acc"]["value"] == r["acc,none"] and got["acc_norm"]["value"] == r["acc_norm,none"], name
        ref_samples = sorted(ref["samples"][ref_name], key=lambda x: x["doc_id"])
        for s_ref, s in zip(ref_samples, res["samples"][name]):
            assert s["loglikelihoods"] == pytest.approx([float(x[0][0]) for x in s_ref["resps"]], abs=1e-4), name
