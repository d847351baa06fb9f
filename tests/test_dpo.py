"""DPO: the loss against hand-computed values and TRL's formula, the loader's answer masks, learning that
happens from ln 2 at step 0, a saved adapter that is what trained, exact resume, world-size equality
under torchrun, and one-line errors."""
import math
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, read_metrics

from rlhf_engine.engine.rl.rlhf_math import dpo_loss

WORDS = "how do i store coffee beans the best way is an airtight container keep them away from light".split()


# ---- the loss ------------------------------------------------------------------------------------

def test_dpo_loss_by_hand():
    # policy log-probs: chosen -10, rejected -12; reference: both -11. Log-ratios +1 and -1, β = 0.1:
    # h = 0.1 * (1 - (-1)) = 0.2; loss = -log σ(0.2) = log(1 + e^-0.2) = 0.598139.
    args = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
    loss, stats = dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert stats.chosen_reward.item() == pytest.approx(0.1) and stats.rejected_reward.item() == pytest.approx(-0.1)
    assert stats.accuracy.item() == 1.0 and stats.margin.item() == pytest.approx(0.2)
    # label smoothing 0.1: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.538325 + 0.079814 = 0.618139
    assert dpo_loss(*args, beta=0.1, label_smoothing=0.1)[0].item() == pytest.approx(0.618139, abs=1e-6)
    # IPO with 4 chosen and 2 rejected answer tokens: h = 1/4 - (-1/2) = 0.75; (0.75 - 1/(2*0.1))^2 = 18.0625
    ipo, _ = dpo_loss(*args, beta=0.1, loss="ipo", chosen_tokens=torch.tensor([4.0]),
                      rejected_tokens=torch.tensor([2.0]))
    assert ipo.item() == pytest.approx(18.0625)
    # policy = reference: loss ln 2, rewards 0, whatever the log-probs
    same = torch.tensor([-3.0, -40.0])
    loss, stats = dpo_loss(same, same + 1, same, same + 1, beta=0.5)
    assert loss.item() == pytest.approx(math.log(2)) and stats.margin.item() == 0 and stats.accuracy.item() == 0
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(*args, beta=0.1, loss="hinge")


def trl_dpo_losses(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    """TRL 0.11.4's DPOTrainer.dpo_loss (trl/trainer/dpo_trainer.py, reference_free False, f-divergence
    reverse KL), transcribed; checked equal to the installed function once (docs/BENCHMARKS.md, DPO). For
    IPO, TRL's concatenated_forward first divides each answer's log-probs by its token count."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return (-F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing)
    return (logits - 1 / (2 * beta)) ** 2


def test_dpo_loss_equals_trls_formula_on_identical_logprobs():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-60 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    n_c, n_r = torch.randint(1, 50, (16,), generator=g).double(), torch.randint(1, 50, (16,), generator=g).double()
    for beta, smoothing in ((0.1, 0.0), (0.5, 0.2), (0.05, 0.0)):
        ours, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=smoothing)
        assert ours.item() == pytest.approx(trl_dpo_losses(pc, pr, rc, rr, beta, "sigmoid", smoothing).mean().item(),
                                            rel=1e-6)
        ours, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss="ipo", chosen_tokens=n_c, rejected_tokens=n_r)
        theirs = trl_dpo_losses(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta, "ipo", 0.0)
        assert ours.item() == pytest.approx(theirs.mean().item(), rel=1e-6)


# ---- the loader's view -----------------------------------------------------------------------------

def pairs_table(rows):
    return pa.table({"qid": list(range(len(rows))), "question": [q for q, _, _ in rows],
                     "date": ["2020-01-01"] * len(rows), "metadata": [["x"]] * len(rows),
                     "response_j": [j for _, j, _ in rows], "response_k": [k for _, _, k in rows]})


def test_answer_mask_covers_the_answer_and_its_eos(tiny_tokenizer_path):
    from rlhf_engine.data.loaders import PairLoader
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.dpo import stack_answers
    tok = Tokenizer(tiny_tokenizer_path)
    rows = [("how do i store coffee beans", "keep them away from light", "why"),
            ("the best way", "an airtight container", "light the beans")]
    loader = PairLoader(pairs_table(rows), tok, batch_size=2, shuffle=False, dpo=True)
    (batch,) = loader
    tokens, mask, answer = stack_answers(loader.chosen, loader.rejected, batch.chosen_prompt_lengths.tolist(),
                                         batch.rejected_prompt_lengths.tolist(), tok.pad_id)
    answers = [j for _, j, _ in rows] + [k for _, _, k in rows]  # rows: chosen sides first, then rejected
    for row, text in enumerate(answers):
        ids = tokens[row][answer[row]].tolist()
        assert ids[-1] == tok.eos_id  # the policy learns to stop
        assert tok.decode(ids[:-1]).strip() == text  # and the answer, nothing of the prompt
    # the reward model's view of the same pairs has no eos and no prompt lengths
    (rm_batch,) = PairLoader(pairs_table(rows), tok, batch_size=2, shuffle=False)
    assert rm_batch.chosen_prompt_lengths is None and tok.eos_id not in rm_batch.chosen_tokens[rm_batch.chosen_mask]


# ---- the stage -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_setup(tiny_tokenizer_path, tmp_path_factory):
    """(base folder, pairs): a random tiny LLaMA, and pairs whose chosen answers end in "thanks" and
    rejected ones in "why"."""
    from rlhf_engine.engine.model.config import ModelConfig
    from rlhf_engine.engine.model.llama import LLaMA
    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    folder = tmp_path_factory.mktemp("dpo")
    torch.manual_seed(0)
    save_model_folder(LLaMA(ModelConfig.preset("tiny", vocab_size=300)).init_weights(std=0.1), str(folder / "base"),
                      tokenizer=tiny_tokenizer_path)
    rng = random.Random(0)
    body = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))  # noqa: E731
    pq.write_table(pairs_table([(body() + "?", body() + " thanks", body() + " why") for _ in range(200)]),
                   folder / "pairs.parquet")
    return str(folder / "base"), str(folder / "pairs.parquet")


def dpo_cfg(setup, out, **kw):
    from rlhf_engine.engine.dpo import DPOConfig
    from rlhf_engine.engine.model.lora import LoRAConfig
    base, data = setup
    return DPOConfig(**{**dict(model=base, data=data, out=str(out), lr=3e-3, warmup_steps=0, batch_size=8,
                               max_steps=30, eval_every=0, log_every=1, save_every=0, beta=0.5,
                               lora=LoRAConfig(r=8, alpha=16, dropout=0.0, targets=("all-linear",))), **kw})


def test_dpo_learns_the_preference_from_ln2_and_saves_what_trained(dpo_setup, tmp_path):
    from rlhf_engine.data.loaders import PairLoader
    from rlhf_engine.data.pairs_io import read_pairs
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.dpo import AnswerLogProbs, stack_answers, train
    from rlhf_engine.engine.training.pair_data import held_out
    from rlhf_engine.engine.training.dist import init_dist
    from rlhf_engine.engine.weights.builder import load_model
    result = train(dpo_cfg(dpo_setup, tmp_path), init_dist("cpu"))
    losses = read_metrics(tmp_path, "train/loss")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy = reference (LoRA B = 0)
    assert read_metrics(tmp_path, "dpo/train_margin")[0] == 0.0
    assert result["dpo/accuracy"] > 0.9 and result["dpo/eval_loss"] < 0.4
    assert 0.3 < result["dpo/longer_wins_accuracy"] < 0.7  # length says nothing here
    # The saved adapter is the trained policy: eval's loader puts it on its base, and its implicit reward
    # ranks the held-out pairs as the stage's own evaluation said.
    tok = Tokenizer(os.path.join(dpo_setup[0], "tokenizer.model"))
    policy = load_model(str(tmp_path / "checkpoint-000030"), tok)
    base = load_model(dpo_setup[0], tok)
    held = PairLoader(held_out(read_pairs(dpo_setup[1]))[1], tok, batch_size=10, shuffle=False, dpo=True)
    tokens, mask, answer = stack_answers(held.chosen, held.rejected, held.chosen_prompt, held.rejected_prompt,
                                         tok.pad_id)
    with torch.no_grad():
        ratio = AnswerLogProbs(policy)(tokens, mask, answer) - AnswerLogProbs(base)(tokens, mask, answer)
    n = len(held.chosen)
    assert (ratio[:n] > ratio[n:]).float().mean().item() == pytest.approx(result["dpo/accuracy"])
    assert 0.5 * (ratio[:n] - ratio[n:]).mean().item() == pytest.approx(result["dpo/margin"], rel=1e-3)
    # beside the length rule on the same pairs: the mean difference, and intervals around both figures
    rule = [(1 + (c > r) - (c < r)) / 2 for c, r in zip(held.chosen_length, held.rejected_length)]
    gap = (ratio[:n] > ratio[n:]).float().mean().item() - sum(rule) / n
    assert result["dpo/minus_length_rule"] == pytest.approx(gap)
    assert result["dpo/minus_length_rule_low"] <= gap <= result["dpo/minus_length_rule_high"]
    assert result["dpo/accuracy_low"] <= result["dpo/accuracy"] <= result["dpo/accuracy_high"]


def test_dpo_resume_is_exact(dpo_setup, tmp_path):
    from rlhf_engine.engine.dpo import train
    from rlhf_engine.engine.training.dist import init_dist
    kw = dict(max_steps=10, save_every=5, keep=10)
    train(dpo_cfg(dpo_setup, tmp_path / "full", **kw), init_dist("cpu"))
    part = tmp_path / "part"
    train(dpo_cfg(dpo_setup, part, **kw), init_dist("cpu"))
    (part / "metrics.jsonl").unlink()  # as if the run had died right after saving step 5
    torch.manual_seed(999)
    train(dpo_cfg(dpo_setup, part, resume=str(part / "checkpoint-000005"), **kw), init_dist("cpu"))
    full, resumed = read_metrics(tmp_path / "full", "train/loss"), read_metrics(part, "train/loss")
    assert min(resumed) == 5 and all(resumed[s] == full[s] for s in resumed)
    assert read_metrics(part, "dpo/eval_loss")[10] == read_metrics(tmp_path / "full", "dpo/eval_loss")[10]


def test_world_size_and_accumulation_do_not_change_the_loss_curve(dpo_setup, tmp_path):
    from test_sft import torchrun
    base, data = dpo_setup
    common = ["dpo", "--model", base, "--data", data, "--lora-targets", "all-linear", "--lora-dropout", "0",
              "--lr", "3e-3", "--warmup-steps", "0", "--max-steps", "4", "--log-every", "1", "--eval-every", "0",
              "--save-every", "0", "--eval-batches", "3", "--beta", "0.5"]
    runs = {"2x2": (2, ["--batch-size", "2"]), "1x2x2": (1, ["--batch-size", "2", "--grad-accum", "2"])}
    curves, evals = {}, {}
    for name, (n, extra) in runs.items():
        out = torchrun(n, *common, *extra, "--out", str(tmp_path / name))
        assert out.returncode == 0, out.stderr[-3000:]
        curves[name] = read_metrics(tmp_path / name, "train/loss")
        evals[name] = {k: read_metrics(tmp_path / name, k)[4] for k in ("dpo/eval_loss", "dpo/eval_pairs")}
    assert curves["1x2x2"][0] == pytest.approx(math.log(2), abs=1e-6) and curves["1x2x2"][3] < curves["1x2x2"][0]
    for step, loss in curves["1x2x2"].items():
        assert abs(curves["2x2"][step] - loss) <= 1e-5 * loss, (step, curves["2x2"][step], loss)
    assert evals["2x2"]["dpo/eval_pairs"] == evals["1x2x2"]["dpo/eval_pairs"] == 6
    assert abs(evals["2x2"]["dpo/eval_loss"] - evals["1x2x2"]["dpo/eval_loss"]) <= 1e-5


def test_bad_flags_and_files_are_one_line_errors(dpo_setup, tmp_path):
    base, data = dpo_setup
    for kw, message in ((dict(lora=None), "dpo needs LoRA"),
                        (dict(loss="ipo", label_smoothing=0.1), "--label-smoothing applies to --loss sigmoid only"),
                        (dict(beta=0.0), "--beta must be > 0"),
                        (dict(label_smoothing=0.5), r"--label-smoothing must be in \[0, 0.5\)")):
        with pytest.raises(ValueError, match=message):
            dpo_cfg(dpo_setup, tmp_path, **kw)
    from rlhf_engine.engine.dpo import train
    from rlhf_engine.engine.training.dist import init_dist
    with pytest.raises(ValueError, match="fit in --max-length 5 tokens"):
        train(dpo_cfg(dpo_setup, tmp_path / "short", max_length=5), init_dist("cpu"))
    # From the command line: one line on stderr, exit 2.
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "dpo", "--model", base,  # noqa
                                     "--out", str(tmp_path / "out"), *a], capture_output=True, text=True, timeout=120)
    for args, message in ((["--data", data, "--no-lora"], "dpo needs LoRA"),
                          (["--data", str(tmp_path / "nope.parquet")], "nope.parquet")):
        out = run(*args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, (args, out.stderr)
