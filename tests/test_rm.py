"""Reward-model stage: separable preferences are learnt, LoRA RM adapters merge into a full
LlamaForSequenceClassification with the head kept, resume is exact."""
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_metrics

from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.rm import RMConfig, train

WORDS = "how do i store coffee beans the best way is an airtight container keep them away from light".split()


@pytest.fixture(scope="module")
def separable_pairs(tmp_path_factory):
    """Chosen answers end in "thanks", rejected ones in "why": trivially separable at the last token."""
    rng = random.Random(0)
    rows = {k: [] for k in ("qid", "question", "date", "metadata", "response_j", "response_k")}
    for i in range(240):
        body = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))  # noqa: E731
        rows["qid"].append(i)
        rows["question"].append(body() + "?")
        rows["date"].append("2020-01-01")
        rows["metadata"].append(["synthetic"])
        rows["response_j"].append(body() + " thanks")
        rows["response_k"].append(body() + " why")
    folder = tmp_path_factory.mktemp("separable")
    pq.write_table(pa.table(rows), folder / "pairs.parquet")
    return str(folder / "pairs.parquet")


def rm_cfg(data, tok, out, **kw):
    return RMConfig(**{**dict(model="tiny", tokenizer=tok, data=data, out=str(out), lora=None, lr=3e-3,
                              batch_size=8, epochs=2, eval_every=0, log_every=1, save_every=0), **kw})


def test_rm_learns_separable_preferences(separable_pairs, tiny_tokenizer_path, tmp_path):
    result = train(rm_cfg(separable_pairs, tiny_tokenizer_path, tmp_path), init_dist("cpu"))
    assert result["rm/accuracy"] > 0.9
    assert 0.3 < result["rm/longer_wins_accuracy"] < 0.7  # length says nothing here
    losses = read_metrics(tmp_path, "train/loss")
    assert sum(list(losses.values())[-5:]) / 5 < 0.5 * sum(list(losses.values())[:5]) / 5


def test_rm_resume_is_exact(separable_pairs, tiny_tokenizer_path, tmp_path):
    kw = dict(epochs=1, save_every=6, keep=10)
    train(rm_cfg(separable_pairs, tiny_tokenizer_path, tmp_path / "full", **kw), init_dist("cpu"))
    part = tmp_path / "part"
    train(rm_cfg(separable_pairs, tiny_tokenizer_path, part, **kw), init_dist("cpu"))
    (part / "metrics.jsonl").unlink()  # as if the run had died right after saving step 6
    torch.manual_seed(999)
    train(rm_cfg(separable_pairs, tiny_tokenizer_path, part, resume=str(part / "checkpoint-000006"), **kw),
          init_dist("cpu"))
    full, resumed = read_metrics(tmp_path / "full", "train/loss"), read_metrics(part, "train/loss")
    assert min(resumed) == 6 and all(resumed[s] == full[s] for s in resumed)


def test_lora_rm_merges_into_a_transformers_sequence_classifier(separable_pairs, tiny_tokenizer_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    from rlhf_engine.engine.weights.adapters import load_adapter
    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    from rlhf_engine.engine.weights.load import load_checkpoint
    from rlhf_engine.engine.model.config import ModelConfig
    from rlhf_engine.engine.model.lora import LoRAConfig
    from rlhf_engine.engine.merge import merge
    from rlhf_engine.engine.model.llama import LLaMA
    base = LLaMA(ModelConfig.preset("tiny", vocab_size=300)).init_weights()
    save_model_folder(base, str(tmp_path / "base"), tokenizer=tiny_tokenizer_path)
    train(rm_cfg(separable_pairs, tiny_tokenizer_path, tmp_path / "rm", model=str(tmp_path / "base"),
                 lora=LoRAConfig(r=8, dropout=0.1, targets=("all-linear",)), epochs=1), init_dist("cpu"))
    adapter = str(sorted((tmp_path / "rm").glob("checkpoint-*"))[-1])
    adapted, _ = load_adapter(load_checkpoint(str(tmp_path / "base"), head="score"), adapter)
    merge(str(tmp_path / "base"), adapter, str(tmp_path / "merged"))
    merged = load_checkpoint(str(tmp_path / "merged"), head="score")
    assert set(merged.state_dict()) == set(load_checkpoint(str(tmp_path / "base"), head="score").state_dict())
    tokens = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        want = adapted.eval()(tokens)[:, -1]
        assert (merged(tokens)[:, -1] - want).abs().max().item() <= 1e-5
        hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        assert (hf(tokens).logits[:, 0] - want).abs().max().item() <= 1e-5
    # The trained score head travels beside the adapter and is what load_adapter puts in place (a fresh
    # random head would also be non-zero, so compare with the file).
    from safetensors.torch import load_file
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))["base_model.model.score.weight"]
    assert torch.equal(adapted.score.weight, saved)


def test_evaluation_does_not_depend_on_the_world_size(separable_pairs, tiny_tokenizer_path, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from test_sft import free_port
    common = ["rm", "--model", "tiny", "--tokenizer", tiny_tokenizer_path, "--data", separable_pairs, "--no-lora",
              "--lr", "3e-3", "--max-steps", "3", "--log-every", "1", "--eval-every", "0", "--save-every", "0",
              "--eval-batches", "3", "--max-length", "256"]
    runs = {"2x2": (2, ["--batch-size", "2"]), "1x2x2": (1, ["--batch-size", "2", "--grad-accum", "2"])}
    evals = {}
    for name, (n, extra) in runs.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(free_port()), os.path.join(ROOT, "train.py"), *common, *extra,
               "--out", str(tmp_path / name)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        keys = ("rm/eval_loss", "rm/accuracy", "rm/eval_pairs", "rm/accuracy_low", "rm/minus_length_rule_high")
        evals[name] = {k: read_metrics(tmp_path / name, k)[3] for k in keys}
    # 3 micro-batches of 2 pairs in all: 6 pairs whatever the world size (per rank, 2 ranks saw 12 and 1 saw 6)
    assert evals["2x2"]["rm/eval_pairs"] == evals["1x2x2"]["rm/eval_pairs"] == 6
    assert evals["2x2"]["rm/accuracy"] == evals["1x2x2"]["rm/accuracy"]
    for key in ("rm/accuracy_low", "rm/minus_length_rule_high"):  # the pairs gathered in the same order
        assert evals["2x2"][key] == evals["1x2x2"][key]
    assert abs(evals["2x2"]["rm/eval_loss"] - evals["1x2x2"]["rm/eval_loss"]) <= 1e-5 * evals["1x2x2"]["rm/eval_loss"]


def test_the_length_rule_reads_uncut_lengths_under_truncate(tmp_path):
    """With --truncate both sides of a long pair are cut to --max-length, yet "the longer answer wins" must
    still see the chosen answer of the first pair as the longer one (read on the cut rows it would tie: 0.25)."""
    from test_data_loaders import TOK, pairs_table

    from rlhf_engine.data.loaders import PairLoader
    from rlhf_engine.engine.rm import evaluate

    class Zeros(torch.nn.Module):
        def forward(self, tokens, mask):
            return torch.zeros(tokens.shape[0])

    table = pairs_table([("ab", "cdefgh", "cdefg"), ("ab", "c", "defg")])  # 29 vs 28 (both cut to 25), 24 vs 27
    held = PairLoader(table, TOK, batch_size=2, max_length=25, shuffle=False, truncate=True)
    cfg = RMConfig(model="tiny", data="unused", out=str(tmp_path), max_length=25, truncate=True, batch_size=2)
    result = evaluate(cfg, Zeros(), held, TOK, init_dist("cpu"))
    assert result["rm/longer_wins_accuracy"] == 0.5  # first pair: chosen longer; second: rejected longer
    assert result["rm/accuracy"] == 0.0 and result["rm/eval_pairs"] == 2  # ties are not wins
    # per pair: model minus rule = 0 - 1 and 0 - 0; every bootstrap mean of those lies in [-1, 0]
    assert result["rm/minus_length_rule"] == -0.5 and -1 <= result["rm/minus_length_rule_low"] < -0.5
    assert -0.5 < result["rm/minus_length_rule_high"] <= 0
    assert result["rm/accuracy_low"] == result["rm/accuracy_high"] == 0.0
