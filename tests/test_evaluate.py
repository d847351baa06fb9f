"""`train.py eval`: identical samples whatever the batch or world size, a model against itself at exactly
0.5 and KL 0, the per-response KL against a separate forward, the judge split, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import train
from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.eval.answers import sequence_kl
from rlhf_engine.engine.evaluate import EvalConfig, evaluate
from rlhf_engine.engine.weights.builder import load_model
from rlhf_engine.engine.model.generate import SamplingConfig


@pytest.fixture(scope="module")
def arms(ppo_base, synthetic_pairs, tmp_path_factory):
    """(base checkpoint, an adapter on it that changes its answers, the evaluation split)."""
    from rlhf_engine.engine.weights.adapters import save_adapter
    from rlhf_engine.engine.weights.load import load_checkpoint
    from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora
    lora = LoRAConfig(r=4, targets=("all-linear",), dropout=0.0)
    model = apply_lora(load_checkpoint(ppo_base[0]), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    adapter = str(tmp_path_factory.mktemp("eval") / "tuned")
    save_adapter(model, lora, adapter, base_model=ppo_base[0])
    return ppo_base[0], adapter, os.path.join(synthetic_pairs[0], "evaluation")


def run(arms, random_rm, out, **kw):
    base, adapter, data = arms
    cfg = EvalConfig(**{**dict(models=(f"base={base}", f"tuned={adapter}"), judges=(f"judge={random_rm}",),
                               data=data, out=str(out), num_prompts=10, bootstrap=200, device="cpu",
                               sampling=SamplingConfig(max_new_tokens=6, seed=3)), **kw})
    return evaluate(cfg, init_dist("cpu"))


def samples(out):
    with open(os.path.join(out, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_model_against_itself_wins_half_with_kl_zero(arms, random_rm, tmp_path):
    base = arms[0]
    result = run(arms, random_rm, tmp_path, models=(f"a={base}", f"b={base}"), samples_per_prompt=2, human=False)
    b = result["arms"]["b"]
    # The same answers; their scores equal to round-off (the arms are scored in different batches, and a
    # batch's composition moves a score by ~1e-7 on 2 threads), so ties that round-off breaks move the rate.
    rows = samples(tmp_path)
    a_rows, b_rows = [r for r in rows if r["arm"] == "a"], [r for r in rows if r["arm"] == "b"]
    assert [r["response"] for r in a_rows] == [r["response"] for r in b_rows]
    assert all(abs(x["scores"]["judge"] - y["scores"]["judge"]) <= 1e-5 for x, y in zip(a_rows, b_rows))
    assert b["judges"]["judge"]["win_rate"]["rate"] == pytest.approx(0.5, abs=0.05) and b["kl"]["mean"] == 0.0
    assert b["judges"]["judge"]["lc_win_rate"]["rate"] == pytest.approx(0.5, abs=0.05)
    for name in ("report.md", "results.json", "samples.jsonl", "frontier.png"):
        assert os.path.getsize(tmp_path / name) > 0


def test_samples_do_not_depend_on_the_batch_size(arms, random_rm, tmp_path):
    run(arms, random_rm, tmp_path / "a", batch_size=3)
    run(arms, random_rm, tmp_path / "b", batch_size=8)
    a, b = samples(tmp_path / "a"), samples(tmp_path / "b")
    assert [r["response"] for r in a] == [r["response"] for r in b] and len(a) == 10 * 4  # 2 models + 2 human
    assert all(abs(x["scores"]["judge"] - y["scores"]["judge"]) <= 1e-5 for x, y in zip(a, b))
    assert any(r["response"] for r in a if r["arm"] == "tuned")


def test_samples_do_not_depend_on_the_world_size(arms, random_rm, tmp_path):
    base, adapter, data = arms
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29400 + os.getpid() % 500 + n), os.path.join(ROOT, "train.py"), "eval", "--models", f"base={base}",
               f"tuned={adapter}", "--judges", f"judge={random_rm}", "--data", data, "--out", str(tmp_path / str(n)),
               "--num-prompts", "9", "--bootstrap", "100", "--max-new-tokens", "5", "--device", "cpu"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
    one, two = samples(tmp_path / "1"), samples(tmp_path / "2")
    assert [(r["question"], r["arm"], r["response"]) for r in one] == [(r["question"], r["arm"], r["response"])
                                                                        for r in two]
    assert all(abs(x["kl"] - y["kl"]) <= 1e-4 for x, y in zip(one, two) if x["kl"] is not None)


def test_kl_equals_a_separate_full_forward(arms):
    from rlhf_engine.data.tokenizer import Tokenizer
    base_dir, adapter, _ = arms
    tok = Tokenizer(os.path.join(base_dir, "tokenizer.model"))
    base, tuned = (load_model(p, tok) for p in (base_dir, adapter))
    prompts, responses = [[1, 40, 41, 42], [1, 50]], [[7, 8, 9, 2], [10, 11]]
    got = sequence_kl(tuned, base, prompts, responses, tok.pad_id, "fp32")
    for p, r, kl in zip(prompts, responses, got):  # each row alone, no padding
        row = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(tuned(row)[0, len(p) - 1:-1], -1)
            ref = torch.log_softmax(base(row)[0, len(p) - 1:-1], -1)
        assert kl == pytest.approx((logp.exp() * (logp - ref)).sum().item(), rel=1e-4, abs=1e-5)
    assert min(got) > 0


def test_the_judge_split_shares_no_question(tmp_path):
    from rlhf_engine.data.pairs_io import read_pairs
    from rlhf_engine.data.prepare import PrepareConfig, prepare
    from rlhf_engine.data.synthetic import write_synthetic_posts
    posts = write_synthetic_posts(tmp_path / "site" / "Posts.xml", 300, seed=1)
    prepare(PrepareConfig(out=str(tmp_path / "pairs"), posts=(str(posts),), progress_seconds=1e9,
                          splits=("finetune=0.3", "reward=0.3", "rl=0.2", "evaluation=0.1", "judge=0.1")))
    questions = {s: set(read_pairs(str(tmp_path / "pairs" / s), columns=("question",))["question"].to_pylist())
                 for s in ("finetune", "reward", "rl", "evaluation", "judge")}
    assert len(questions["judge"]) > 5
    assert all(not (questions["judge"] & q) for s, q in questions.items() if s != "judge")


def one_line_error(capsys, *argv):
    assert train.main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_bad_input_is_one_line(arms, random_rm, tmp_path, capsys):
    base, adapter, data = arms
    common = ["--data", data, "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert "is not a reward model" in one_line_error(capsys, "--models", base, "--judges", base, *common)
    assert "--num-prompts must be >= 1" in one_line_error(capsys, "--models", base, "--judges", random_rm,
                                                          "--num-prompts", "0", *common)
    from rlhf_engine.data.pairs_io import PairWriter
    os.makedirs(tmp_path / "empty")
    PairWriter(str(tmp_path / "empty" / "pairs.parquet")).close()
    assert "has no questions" in one_line_error(capsys, "--models", base, "--judges", random_rm, "--data",
                                                str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    from rlhf_engine.engine.model.config import ModelConfig
    from rlhf_engine.engine.model.llama import LLaMA
    other = LLaMA(ModelConfig.preset("tiny", vocab_size=600)).init_weights()
    save_model_folder(other, str(tmp_path / "other"))
    assert "vocab" in one_line_error(capsys, "--models", base, str(tmp_path / "other"), "--judges", random_rm,
                                     *common)


def test_an_rm_adapter_judge_scores_like_its_merged_rm(ppo_base, tmp_path):
    """A judge given as an RM adapter folder is scored with its adapter active (not the bare base)."""
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.weights.adapters import save_adapter
    from rlhf_engine.engine.weights.load import load_checkpoint
    from rlhf_engine.engine.rl.reward import load_reward_model
    from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora
    from rlhf_engine.engine.merge import merge
    lora = LoRAConfig(r=4, targets=("all-linear",), dropout=0.0)
    rm = apply_lora(load_checkpoint(ppo_base[0], head="score"), lora)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(rm, lora, str(tmp_path / "rm"), base_model=ppo_base[0], task_type="SEQ_CLS",
                 modules_to_save={"score.weight": rm.score.weight})
    merge(ppo_base[0], str(tmp_path / "rm"), str(tmp_path / "merged"))
    tok = Tokenizer(os.path.join(ppo_base[0], "tokenizer.model"))
    adapter_fn, merged_fn = (load_reward_model(str(tmp_path / p), tok, "fp32", torch.device("cpu"), False)
                             for p in ("rm", "merged"))
    tokens = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert torch.allclose(adapter_fn(tokens, mask), merged_fn(tokens, mask), atol=1e-5)


def test_questions_whose_prompt_leaves_no_room_for_an_answer_are_left_out(arms):
    from rlhf_engine.data.tokenizer import Tokenizer, format_prompt
    from rlhf_engine.engine.eval.questions import load_questions
    base, _, data = arms
    tok = Tokenizer(os.path.join(base, "tokenizer.model"))
    everything = load_questions(data, None)
    lengths = sorted(len(tok.encode(format_prompt(q.text), bos=True)) for q in everything)
    limit = lengths[len(lengths) // 2]  # about half fit
    kept = load_questions(data, None, tok, limit)
    assert 0 < len(kept) < len(everything)
    assert all(len(tok.encode(format_prompt(q.text), bos=True)) <= limit for q in kept)
    assert [q.index for q in kept] == sorted(q.index for q in kept)  # original indices: the seeds do not move
    with pytest.raises(ValueError, match="no question's prompt fits in 3 tokens"):
        load_questions(data, None, tok, 3)


@pytest.mark.parametrize("sign, holds", [(1.0, {"attack: code padding": False}), (-1.0, {"attack: code padding": True})])
def test_attacks_are_scored_and_a_judge_they_fool_is_called_unreliable(arms, random_rm, tmp_path, monkeypatch,
                                                                      capsys, sign, holds):
    """A judge that scores length (sign 1) is fooled by padding the baseline's answer with code blocks (longer
    on every question); one that scores brevity (sign -1) sees through it. The attack arms are built from
    the baseline's own answers and the question text."""
    import rlhf_engine.engine.evaluate as evaluate_module
    monkeypatch.setattr(evaluate_module, "load_reward_model",
                        lambda *a, **k: lambda tokens, mask: sign * mask.sum(1).float())
    result = run(arms, random_rm, tmp_path, attacks=True, human=False)
    rows = samples(tmp_path)
    base = {r["question"]: r["response"] for r in rows if r["arm"] == "base"}
    padded = {r["question"]: r["response"] for r in rows if r["arm"] == "attack: code padding"}
    echoed = [r for r in rows if r["arm"] == "attack: question echoed"]
    assert padded.keys() == base.keys() and all(padded[q].startswith(base[q]) and "```" in padded[q] for q in base)
    assert echoed and all(r["response"] == r["question_text"] for r in echoed)
    code = result["attacks"]["attack: code padding"]["judge"]
    assert code == {"loses_share": 0.0 if sign > 0 else 1.0, "holds": holds["attack: code padding"]}
    out = capsys.readouterr().out
    assert ("judge is unreliable against this hack" in out) == (sign > 0)


def test_best_of_n_keeps_the_proxys_favourite_of_n_fresh_samples(arms, random_rm, tmp_path, monkeypatch):
    """--best-of 3 with a proxy that scores length: each question's best-of answer is the longest of its three
    candidates (drawn with their own seeds, none the baseline's own sample), at KL log 3 - 2/3."""
    import math

    import rlhf_engine.engine.evaluate as evaluate_module
    monkeypatch.setattr(evaluate_module, "load_reward_model", lambda *a, **k: lambda tokens, mask: mask.sum(1).float())
    drawn, real = [], evaluate_module.sample_arm

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("first"):
            drawn.append(out)
        return out
    monkeypatch.setattr(evaluate_module, "sample_arm", spy)
    result = run(arms, random_rm, tmp_path, best_of=3, proxy=f"proxy={random_rm}", human=False, kl=True)
    (candidates,) = drawn
    picked = [r for r in samples(tmp_path) if r["arm"] == "best-of-3 (proxy)"]
    assert len(picked) == 10 and len(candidates) == 30
    for n, r in enumerate(sorted(picked, key=lambda r: r["question"])):
        assert r["length"] == max(len(c) for c in candidates[3 * n:3 * n + 3])
        assert r["kl"] == pytest.approx(math.log(3) - 2 / 3)
    assert "best-of-3 (proxy)" in result["arms"]
    with pytest.raises(ValueError, match="--best-of must be 0 or at least 2, and needs --proxy"):
        run(arms, random_rm, tmp_path / "x", best_of=3)
