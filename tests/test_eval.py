"""Evaluation harness: shared-prefix scoring equals independent forward passes; every benchmark format is loaded,
prompted and scored as lm-evaluation-harness does it (expected log-likelihoods recomputed here by a direct forward
pass, acc / acc_norm / mc2 re-derived by hand); perplexity with sliding windows; generation tasks; malformed files;
the CLI; and a remote OpenAI-compatible endpoint (lmstack serve) giving the same numbers as local evaluation."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import lmstack
from lmstack.checkpoint import save_checkpoint
from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.eval import LocalBackend, evaluate, mc2_metric, mc_metrics, perplexity, resolve_tasks, score_choices
from lmstack.eval import metrics as M
from lmstack.models.transformer import Transformer
from lmstack.tokenizer import train_bpe

from conftest import llama_cfg_dict, make_text, tiny_cfg_dict

FIX = Path(__file__).parent / "fixtures" / "eval"


def _fixture_texts() -> list[str]:
    out = []
    for f in sorted(FIX.rglob("*")):
        if f.is_file() and f.parent.name != "bad":
            out.append(f.read_text(encoding="utf-8"))
    return out


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random Llama-style model (block 512) over a BPE tokenizer trained on the fixture texts: prompts are not
    truncated and token boundaries are realistic (merges across words, spaces attached to the next word)."""
    tok = train_bpe([make_text(300)] + _fixture_texts() * 2, vocab_size=400, special_tokens=["<|endoftext|>"])
    cfg = ModelConfig(**llama_cfg_dict(vocab_size=tok.vocab_size, block_size=512, n_embd=48, n_head=4,
                                       n_kv_head=2))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # spread the logits so choices differ clearly
        model.lm_head.weight.mul_(20)
    d = tmp_path_factory.mktemp("evalmodel") / "ckpt"
    save_checkpoint(d, model, tok)
    return lmstack.load(d)


def direct_ll(lm, context: str, continuation: str) -> float:
    """log P(continuation | context) from one plain forward pass over the lm-eval tokenization, no cache."""
    tok = lm.tokenizer
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context, add_special_tokens=True)
    whole = tok.encode(context + continuation, add_special_tokens=True)
    cont = whole[len(ctx):]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids)[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


# ---- shared-prefix scoring -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_score_choices_equals_independent_passes(family):
    torch.manual_seed(1)
    cfg = ModelConfig(**(llama_cfg_dict if family == "llama" else tiny_cfg_dict)(vocab_size=64, block_size=24))
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 64, (9,), generator=g).tolist()
    conts = [torch.randint(0, 64, (k,), generator=g).tolist() for k in (1, 4, 2, 7)]
    conts.append(torch.randint(0, 64, (20,), generator=g).tolist())  # 9 + 20 - 1 > 24: left-truncated alone
    got = score_choices(model, ctx, conts)
    for c, (ll, greedy) in zip(conts, got):
        ids = (ctx + c)[-(cfg.block_size + 1):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
        rows = logp[len(ids) - 1 - len(c):]
        want = float(sum(rows[i, t] for i, t in enumerate(c)))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(rows[i].argmax()) == t for i, t in enumerate(c))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_score_batch_of_questions_equals_independent_passes(family):
    from lmstack.eval.backend import score_batch
    torch.manual_seed(2)
    cfg = ModelConfig(**(llama_cfg_dict if family == "llama" else tiny_cfg_dict)(vocab_size=64, block_size=24))
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)

    def rnd(n):
        return torch.randint(0, 64, (n,), generator=g).tolist()
    items = [(rnd(3), [rnd(1), rnd(5)]), (rnd(11), [rnd(2), rnd(1), rnd(3), []]), (rnd(7), [rnd(4)])]
    got = score_batch(model, items)  # contexts of 3, 11 and 7 tokens: left-padded together
    for (ctx, conts), res in zip(items, got):
        alone = score_choices(model, ctx, conts)
        assert [r[0] for r in res] == pytest.approx([r[0] for r in alone], abs=1e-4)
        assert [r[1] for r in res] == [r[1] for r in alone]
        for c, (ll, _) in zip(conts, res):
            if c:
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([(ctx + c)[:-1]]))[0].double(), -1)
                assert ll == pytest.approx(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(c))),
                                           abs=1e-4)
    # padded rows that would pass the window fall back to one question at a time
    long = [(rnd(20), [rnd(1)]), (rnd(2), [rnd(15)])]
    for (ctx, conts), res in zip(long, score_batch(model, long)):
        assert [r[0] for r in res] == pytest.approx([r[0] for r in score_choices(model, ctx, conts)], abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_does_not_change_results(tiny_lm, batch_size):
    a = evaluate(tiny_lm, "mmlu,hellaswag", data_dir=FIX, batch_size=batch_size, log_samples=True)
    b = evaluate(tiny_lm, "mmlu,hellaswag", data_dir=FIX, batch_size=8, log_samples=True)
    for name, ss in a["samples"].items():
        for x, y in zip(ss, b["samples"][name]):
            assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-4)
        assert a["results"][name]["metrics"] == b["results"][name]["metrics"]


def test_encode_pair_follows_lm_eval(tiny_lm):
    b = LocalBackend(tiny_lm)
    tok = tiny_lm.tokenizer
    ctx, cont = b.encode_pair("Question: the cat sat \n", "on the mat")  # trailing whitespace moves over
    assert ctx == tok.encode("Question: the cat sat")
    assert ctx + cont == tok.encode("Question: the cat sat \non the mat")
    ctx, cont = b.encode_pair("", " the dog")  # empty context: the BOS/EOS prefix token
    assert ctx == [tok.eos_id] and cont == tok.encode(" the dog")


# ---- metrics by hand ---------------------------------------------------------------------------------------------
def test_mc_metrics_hand_checked():
    # lls: choice 0 wins raw; per character "a longer answer" (15 chars) -> -6/15 = -0.4 beats -2/1 and -3/3
    m = mc_metrics([-2.0, -6.0, -3.0], ["A", "a longer answer", "abc"], gold=1)
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0
    m = mc_metrics([-2.0, -6.0, -3.0], ["A", "a longer answer", "abc"], gold=0)
    assert m["acc"] == 1.0 and m["acc_norm"] == 0.0
    # acc_norm counts characters, acc_bytes UTF-8 bytes: "é" is 1 char, 2 bytes
    m = mc_metrics([-1.0, -1.5], ["é", "ab"], gold=0, bytes=True)
    assert m["acc_norm"] == 0.0 and m["acc_bytes"] == 1.0  # chars: -1/1 < -1.5/2; bytes: -1/2 > -1.5/2
    # ties go to the first choice (numpy argmax)
    assert mc_metrics([-1.0, -1.0], ["x", "y"], gold=0)["acc"] == 1.0


def test_mc2_and_stderr_hand_checked():
    lls = [math.log(0.2), math.log(0.1), math.log(0.3)]
    assert mc2_metric(lls, [1, 1, 0]) == pytest.approx(0.3 / 0.6)
    assert M.stderr([1, 0, 1, 1]) == pytest.approx(math.sqrt(0.25) / 2)
    assert M.extract_strict("so 5 + 2 = 7\n#### 7") == "7"
    assert M.extract_flexible("he pays $1,200. Then 3 more") == "3"
    assert M.exact_match(M.extract_flexible("The answer is $1,200."), ["1200"]) == 1.0


# ---- every format, end to end, against direct log-likelihoods -------------------------------------------------
EXPECTED_CONTEXT = {  # prompts written out by hand from lm-eval's task configs
    "mmlu_astronomy": ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                       "What is the closest star to Earth?\nA. Proxima Centauri\nB. The Sun\nC. Sirius\nD. Vega\n"
                       "Answer: B\n\nHow many planets are in the Solar System?\nA. 7\nB. 8\nC. 9\nD. 10\nAnswer:"),
    "hellaswag": "Roof shingle removal: A man is sitting on a roof. He",
    "arc_easy": ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is "
                 "the most likely effect of this increase in rotation?\nAnswer:"),
    "wic": ("Sentence 1: He sat on the bank of the river.\nSentence 2: She deposited money in the bank.\n"
            "Question: Is the word 'bank' used in the same way in the two sentences above?\nAnswer:"),
}


def test_prompts_match_lm_eval_formats():
    tasks = {t.name: t for t in resolve_tasks(f"mmlu_astronomy,hellaswag,arc_easy,wic={FIX / 'wic_superglue'}",
                                              FIX)}
    assert tasks["mmlu_astronomy"].context(tasks["mmlu_astronomy"].docs[0], 1) == EXPECTED_CONTEXT["mmlu_astronomy"]
    for name in ("hellaswag", "arc_easy", "wic"):
        assert tasks[name].context(tasks[name].docs[0], 0) == EXPECTED_CONTEXT[name]
    # the bracketed WikiHow artefacts are removed as lm-eval's hellaswag preprocess does
    hs = tasks["hellaswag"].docs[2]
    assert hs.context == "Home and Garden: How to clean a grill. Heat the grill. Then"
    assert hs.choices[0] == "scrub the grates with a brush."
    # the original WiC txt and the SuperGLUE jsonl give the same surface word and gold labels
    txt = resolve_tasks("wic", FIX)[0]
    assert "the word 'bank'" in txt.docs[0].context and [d.gold for d in txt.docs] == [0, 0, 1]


@pytest.mark.parametrize("spec,shots", [
    ("mmlu", 1), ("truthfulqa_mc1", 0), ("truthfulqa_mc2", 0), (f"truthfulqa_mc2={FIX}/truthfulqa/TruthfulQA.csv", 0),
    ("wic", 1), (f"wic={FIX}/wic_superglue", 0), ("hellaswag", 0), ("arc_easy", 0), ("arc_challenge", 0),
    ("bigbench_tiny_mc", 2),
])
def test_task_scores_match_direct_forward(tiny_lm, spec, shots):
    res = evaluate(tiny_lm, spec, data_dir=FIX, shots=shots, log_samples=True)
    for task in resolve_tasks(spec, FIX):
        samples = res["samples"][task.name]
        per: dict[str, list[float]] = {}
        for doc, s in zip(task.docs, samples):
            ctx = task.context(doc, shots)
            want = [direct_ll(tiny_lm, ctx, " " + c) for c in doc.choices]
            assert s["loglikelihoods"] == pytest.approx(want, abs=1e-4)
            if task.kind == "mc2":
                p = [math.exp(x) for x in want]
                m = {"acc": sum(pi for pi, lab in zip(p, doc.labels) if lab) / sum(p)}
            else:
                best = max(range(len(want)), key=lambda i: (want[i], -i))
                best_n = max(range(len(want)), key=lambda i: (want[i] / len(doc.choices[i]), -i))
                m = {"acc": float(best == doc.gold), "acc_norm": float(best_n == doc.gold)}
            for k, v in m.items():
                per.setdefault(k, []).append(v)
        for k, vals in per.items():
            got = res["results"][task.name]["metrics"][k]
            assert got["value"] == pytest.approx(sum(vals) / len(vals), abs=1e-6), (task.name, k)
            assert got["n"] == len(vals)
    if spec == "mmlu":  # macro-average over the two subjects, stderr combined in quadrature
        subj = [res["results"][n]["metrics"]["acc"] for n in ("mmlu_astronomy", "mmlu_high_school_geography")]
        g = res["groups"]["mmlu"]["acc"]
        assert g["value"] == pytest.approx((subj[0]["value"] + subj[1]["value"]) / 2)
        assert g["n"] == 7


# ---- generation ------------------------------------------------------------------------------------------------
def test_generation_tasks_greedy_and_extracted(tiny_lm):
    res = evaluate(tiny_lm, "gsm8k,bigbench_tiny_gen", data_dir=FIX, shots=1, max_new_tokens=12, log_samples=True)
    for name, until in (("gsm8k", ["Question:", "</s>", "<|im_end|>"]), ("bigbench_tiny_gen", ["\n"])):
        for s in res["samples"][name]:
            assert s["output"] == tiny_lm.generate(s["prompt"], max_new_tokens=12, temperature=0, stop=until)
    g = res["results"]["gsm8k"]["metrics"]
    assert set(g) == {"exact_match_strict", "exact_match_flexible"} and g["exact_match_strict"]["n"] == 2
    assert resolve_tasks("gsm8k", FIX)[0].docs[0].answers == ["72"]


# ---- perplexity --------------------------------------------------------------------------------------------------
def test_perplexity_short_text_is_one_forward_pass(tiny_lm):
    text = "The quick brown fox jumps over the lazy dog."
    tok = tiny_lm.tokenizer
    ids = [tok.eos_id] + tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_lm.model(torch.tensor([ids[:-1]]))[0].double(), -1)
    nats = -float(sum(logp[i, t] for i, t in enumerate(ids[1:])))
    r = perplexity(tiny_lm, text)
    assert r["tokens"] == len(ids) - 1
    assert r["nats"] == pytest.approx(nats, rel=1e-5)
    assert r["token_perplexity"] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nats / (math.log(2) * len(text.encode())), rel=1e-5)


@pytest.mark.parametrize("stride", [16, 10, 7, 1])
def test_perplexity_sliding_window_matches_manual(tiny_lm, stride):
    text = make_text(8, seed=3)
    tok = tiny_lm.tokenizer
    ids = [tok.eos_id] + tok.encode(text)
    L = 16
    assert len(ids) > 3 * L
    # written out: the first window (L inputs) scores tokens 1..L; then each window of the L tokens before the
    # next `stride` targets scores them
    nats, scored, ctx_lens = 0.0, [], []
    chunks = [(1, L + 1)] + [(s, min(s + stride, len(ids))) for s in range(L + 1, len(ids), stride)]
    for s, e in chunks:
        inp = ids[max(0, e - 1 - L):e - 1]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_lm.model(torch.tensor([inp]))[0].double(), -1)
        for t in range(s, e):
            j = t - (e - 1 - len(inp)) - 1  # input position that predicts token t
            nats -= float(logp[j, ids[t]])
            scored.append(t)
            ctx_lens.append(j + 1)
    assert min(ctx_lens[L:]) >= L - stride + 1
    assert scored == list(range(1, len(ids)))  # every token once
    r = perplexity(tiny_lm, text, stride=stride, max_length=L)
    assert r["tokens"] == len(ids) - 1
    assert r["nats"] == pytest.approx(nats, rel=1e-5)


def test_perplexity_task_on_a_corpus_file(tiny_lm, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(make_text(5))
    res = evaluate(tiny_lm, f"perplexity={f}", stride=32, max_length=64)
    m = res["results"]["perplexity:c.txt"]["metrics"]
    assert m["bits_per_byte"]["value"] == pytest.approx(perplexity(tiny_lm, f.read_text(), 32, 64)["bits_per_byte"])


# ---- malformed data --------------------------------------------------------------------------------------------
def test_malformed_files_name_file_and_line(tmp_path):
    with pytest.raises(LMStackError, match=r"bad\.jsonl:2: invalid JSON"):
        resolve_tasks(f"gsm8k={FIX / 'bad' / 'bad.jsonl'}")
    root = tmp_path / "mmlu"
    (root / "test").mkdir(parents=True)
    (root / "test" / "x_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,d\n")
    with pytest.raises(LMStackError, match=r"x_test\.csv:2: expected 6 columns"):
        resolve_tasks(f"mmlu={root}")
    (root / "test" / "x_test.csv").write_text('q,a,b,c,d,A\n"multi\nline",a,b,c,d,E\n')
    with pytest.raises(LMStackError, match=r"x_test\.csv:2: answer must be one of A/B/C/D"):
        resolve_tasks(f"mmlu={root}")
    bad = tmp_path / "task.json"
    bad.write_text('{"examples": [\n {"input": "x", "target_scores": {"a": 1}},\n oops]}')
    with pytest.raises(LMStackError, match=r"task\.json:3: invalid JSON"):
        resolve_tasks(f"bigbench_x={bad}")
    with pytest.raises(LMStackError, match="unknown task"):
        resolve_tasks("nosuchtask")
    with pytest.raises(LMStackError, match="no data for task 'hellaswag'"):
        resolve_tasks("hellaswag", tmp_path)


def test_built_arithmetic_task_and_bigbench_variants(tiny_lm, tmp_path):
    from lmstack.eval.download import build_arithmetic
    build_arithmetic(tmp_path, n=6)
    mc = resolve_tasks("bigbench_arithmetic_mc", tmp_path)[0]
    assert mc.kind == "mc" and len(mc.docs) == 6 and all(len(d.choices) == 4 for d in mc.docs)
    d = mc.docs[0]
    a, op, b = d.context.split("What is ")[1].rstrip("?\nA:").split(" ")
    assert d.choices[d.gold] == str(int(a) + int(b) if op == "plus" else int(a) - int(b))
    gen = resolve_tasks("bigbench_arithmetic_gen", tmp_path)[0]
    assert gen.kind == "gen" and gen.docs[0].answers == [d.choices[d.gold]]
    # multiple_choice_targets / multiple_choice_scores, the other BIG-bench MC layout
    tiny = resolve_tasks("bigbench_tiny_mc", FIX)[0]
    assert tiny.docs[3].choices == ["12", "3", "4"] and tiny.docs[3].gold == 1


def test_interrupted_run_resumes(tiny_lm, tmp_path):
    out = tmp_path / "res.json"
    clean = evaluate(tiny_lm, "arc_easy,truthfulqa_mc2,gsm8k", data_dir=FIX, max_new_tokens=4)

    class Flaky(LocalBackend):  # interrupted while scoring the third question
        calls = 0

        def loglikelihood_batch(self, requests):
            Flaky.calls += 1
            if Flaky.calls == 3:
                raise KeyboardInterrupt
            return super().loglikelihood_batch(requests)
    with pytest.raises(KeyboardInterrupt):
        evaluate(Flaky(tiny_lm), "arc_easy,truthfulqa_mc2,gsm8k", data_dir=FIX, max_new_tokens=4, out=out,
                 batch_size=1)
    partial = Path(str(out) + ".partial.jsonl")
    assert not out.exists() and len(partial.read_text().splitlines()) == 2
    res = evaluate(tiny_lm, "arc_easy,truthfulqa_mc2,gsm8k", data_dir=FIX, max_new_tokens=4, out=out)
    assert res["resumed_requests"] == 2 and not partial.exists()
    def close(a, b):  # batches of other sizes/compositions round differently (~1e-12 here)
        return {k: pytest.approx(v, rel=1e-6, abs=1e-9) for k, v in b.items()} == a
    for name in ("arc_easy", "truthfulqa_mc2", "gsm8k"):
        for k, m in clean["results"][name]["metrics"].items():
            assert close(res["results"][name]["metrics"][k], m), (name, k)
    saved = json.loads(out.read_text())["results"]["arc_easy"]["metrics"]
    assert all(close(saved[k], m) for k, m in clean["results"]["arc_easy"]["metrics"].items())


def test_resume_cache_cuts_a_torn_line(tiny_lm, tmp_path):
    """The partial log is a JsonlLog: a line cut by the interruption is skipped and cut off on reopening, so the
    next answer starts on its own line."""
    from lmstack.data.jsonl import read_log
    from lmstack.eval.run import ResumeCache
    path = tmp_path / "r.partial.jsonl"
    c = ResumeCache(LocalBackend(tiny_lm), path)
    first = c.loglikelihood_choices("Question: hi\nAnswer:", [" yes", " no"])
    c.close()
    with open(path, "ab") as f:
        f.write(b'{"k": "torn", "v": [[')
    c = ResumeCache(LocalBackend(tiny_lm), path)
    assert c.loglikelihood_choices("Question: hi\nAnswer:", [" yes", " no"]) == first and c.hits == 1
    c.loglikelihood_choices("Question: bye\nAnswer:", [" yes", " no"])
    c.close()
    assert [len(r["v"]) for r in read_log(path)] == [2, 2] and b"torn" not in path.read_bytes()


def test_run_eval_from_config(tiny_lm, tmp_path):
    """EvalConfig + run_eval (what `lmstack eval` builds) equals the keyword `evaluate`; a path loads with dtype; the
    results JSON is written atomically (no temp file left beside it)."""
    from lmstack.eval import EvalConfig, run_eval
    out = tmp_path / "sub" / "res.json"
    cfg = EvalConfig(model=tiny_lm.path, tasks="arc_easy,bigbench_tiny_mc", data_dir=str(FIX), limit=2, shots=1,
                     dtype="float32", out=out)
    res = run_eval(cfg)
    want = evaluate(tiny_lm, "arc_easy,bigbench_tiny_mc", data_dir=str(FIX), limit=2, shots=1)
    for name in ("arc_easy", "bigbench_tiny_mc"):
        assert res["results"][name]["metrics"] == want["results"][name]["metrics"]
    assert res["model"] == want["model"] and res["config"] == want["config"]
    assert json.loads(out.read_text())["tasks"] == ["arc_easy", "bigbench_tiny_mc"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["res.json"]  # no .tmp, no .partial.jsonl


def test_cli_eval_data_builds_offline_sets(tmp_path, capsys):
    """`lmstack eval-data NAME --out DIR` (was `python -m lmstack.eval.download`): prints the folder it wrote."""
    from lmstack.cli import main
    from lmstack.eval.download import DOWNLOADERS
    assert main(["eval-data", "arithmetic", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "bigbench")
    assert resolve_tasks("bigbench_arithmetic_mc", tmp_path)[0].kind == "mc"
    assert not list(tmp_path.rglob(".*"))  # atomic writes leave no temp files
    assert main(["eval-data", "nosuch", "--out", str(tmp_path)]) == 2
    assert "no downloader for 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval-data", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in DOWNLOADERS) and "bigbench:<task>" in text


# ---- CLI -------------------------------------------------------------------------------------------------------
def test_cli_eval_prints_table_and_writes_json(tiny_lm, tmp_path, capsys):
    from lmstack.cli import main
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", tiny_lm.path, "--tasks", "arc_easy,bigbench_tiny_mc", "--data-dir", str(FIX),
               "--shots", "1", "--limit", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| task | metric | value | stderr | n |" in text and "| arc_easy | acc |" in text
    res = json.loads(out.read_text())
    assert res["config"]["shots"] == 1 and res["config"]["limit"] == 2 and res["seed"] == 1234
    assert "lmstack" in res["versions"] and "torch" in res["versions"]
    assert res["results"]["bigbench_tiny_mc"]["metrics"]["acc"]["n"] == 2
    assert main(["eval", "--model", tiny_lm.path, "--tasks", "hellaswag", "--data-dir", str(tmp_path)]) == 2


# ---- remote endpoint (lmstack serve) ---------------------------------------------------------------------------
def test_remote_endpoint_matches_local(tiny_lm):
    pytest.importorskip("httpx")
    from conftest import start_server
    from lmstack.eval.remote import RemoteBackend
    from lmstack.serve.app import create_app
    server, th, url = start_server(create_app(tiny_lm, "tiny"))
    try:
        local = evaluate(tiny_lm, "arc_easy,truthfulqa_mc2", data_dir=FIX, log_samples=True)
        for tokenizer in (tiny_lm.path, None):
            rb = RemoteBackend(url, "tiny", tokenizer=tokenizer)
            rb.prompts_per_request = 3  # TruthfulQA MC2 questions have 3-4 answers: split over requests
            remote = evaluate(rb, "arc_easy,truthfulqa_mc2", data_dir=FIX, log_samples=True)
            for name in ("arc_easy", "truthfulqa_mc2"):
                for a, b in zip(local["samples"][name], remote["samples"][name]):
                    assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=1e-4)
                assert remote["results"][name]["metrics"]["acc"]["value"] == \
                    pytest.approx(local["results"][name]["metrics"]["acc"]["value"])
        from lmstack.cli import main
        assert main(["eval", "--model", "tiny", "--base-url", url, "--tasks", "arc_easy", "--data-dir", str(FIX),
                     "--no-progress"]) == 0
        out = RemoteBackend(url, "tiny").generate(["Question: hi\nAnswer:"], ["\n"], 5)
        assert out == [tiny_lm.generate("Question: hi\nAnswer:", max_new_tokens=5, temperature=0, stop=["\n"])]
    finally:
        server.should_exit = True
        th.join(timeout=5)


# ---- the real model ----------------------------------------------------------------------------------------------
def test_smollm2_shared_prefix_exact_and_mmlu_runs():
    path = Path(os.environ.get("LMSTACK_GGUF", Path(__file__).resolve().parents[2] / "shared" / "models" /
                               "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        pytest.skip(f"no GGUF model at {path} (set LMSTACK_GGUF)")
    from lmstack.generate.score import score
    lm = lmstack.load(path, dtype="float32")  # exactness: float weights (packed kernels are not batch-invariant)
    b = LocalBackend(lm)
    task = resolve_tasks("arc_easy", FIX)[0]
    ctx = task.context(task.docs[0])
    conts = [" " + c for c in task.docs[0].choices]
    got = b.loglikelihood_choices(ctx, conts)
    for c, (ll, greedy) in zip(conts, got):
        want = score(lm.model, *b.encode_pair(ctx, c))
        assert ll == pytest.approx(want[0], abs=1e-3) and greedy == want[1]
    res = evaluate(lm, "mmlu_astronomy", data_dir=FIX, shots=1)
    assert res["results"]["mmlu_astronomy"]["metrics"]["acc"]["n"] == 4


def test_bigbench_task_with_subtasks_is_a_group(tiny_lm, tmp_path):
    """BIG-bench tasks like logical_deduction keep their examples in subtask folders: one task per subtask, plus the
    group's macro-average."""
    import json as _json
    import shutil
    root = tmp_path / "bigbench" / "deduction"
    for sub in ("three_objects", "five_objects"):
        (root / sub).mkdir(parents=True)
        shutil.copy(FIX / "bigbench" / "tiny_mc" / "task.json", root / sub / "task.json")
    (root / "task.json").write_text(_json.dumps({"name": "deduction", "description": "group", "keywords": []}))
    tasks = resolve_tasks("bigbench_deduction", tmp_path)
    assert [t.name for t in tasks] == ["bigbench_deduction:five_objects", "bigbench_deduction:three_objects"]
    assert all(t.group == "bigbench_deduction" and t.kind == "mc" for t in tasks)
    res = evaluate(tiny_lm, "bigbench_deduction", data_dir=tmp_path)
    accs = [res["results"][t.name]["metrics"]["acc"]["value"] for t in tasks]
    assert res["groups"]["bigbench_deduction"]["acc"]["value"] == pytest.approx(sum(accs) / 2)
