"""PPO diagnostics on hand-computed batches: reward/length statistics split by how responses ended,
negative-KL token counts by type, repeated-token share, and the two warnings."""
import math

import pytest
import torch

from rlhf_engine.engine.training.dist import all_reduce_named, init_dist
from rlhf_engine.engine.rl.diagnostics import (failure_warnings, length_metrics, length_sums, negative_kl_metrics,
                                               negative_kl_sums, repeated_token_share, reward_metrics, reward_sums,
                                               token_kind)


class Log:
    def __init__(self):
        self.warnings = []

    def warn(self, msg):
        self.warnings.append(msg)


class Pieces:
    """A tokenizer stand-in: id -> sentencepiece piece."""
    PIECES = {0: "<unk>", 1: "\u2581the", 2: ",", 3: "\u2581", 4: "\u258142", 5: "<0x0A>"}

    @staticmethod
    def piece(i):
        return Pieces.PIECES[i]


@pytest.mark.parametrize("piece, kind", [("\u2581the", "word"), (",", "punctuation"), ("```", "punctuation"),
                                         ("\u2581", "whitespace"), ("\u258142", "digit"), ("<0x0A>", "special/byte"),
                                         ("</s>", "special/byte"), ("x2", "word"),
                                         # byte-level BPE spells a space Ġ and a newline Ċ
                                         ("Ġthe", "word"), ("Ġ", "whitespace"), ("ĊĠĠ", "whitespace"),
                                         ("4", "digit"), ("Ġ```", "punctuation"), ("<|im_end|>", "special/byte")])
def test_token_kind(piece, kind):
    assert token_kind(piece) == kind


def reduced(sums):
    """A world of one's all_reduce_named: the local sums, as floats."""
    return all_reduce_named(init_dist("cpu"), sums)


def test_reward_and_length_statistics_by_ending():
    raw, ended = torch.tensor([1.0, 3.0, -2.0, 6.0]), torch.tensor([True, True, False, True])
    s = reward_metrics(reduced(reward_sums(raw, raw - 1.0, ended)), raw)
    assert s["env/reward_mean"] == pytest.approx(2.0)
    assert s["env/reward_std"] == pytest.approx(math.sqrt((1 + 1 + 16 + 16) / 4))
    assert (s["env/reward_min"], s["env/reward_max"]) == (-2.0, 6.0)
    assert s["env/shaped_reward_mean"] == pytest.approx(1.0)
    assert s["env/reward_mean_ended"] == pytest.approx(10 / 3) and s["env/reward_mean_truncated"] == -2.0
    lengths = length_metrics(reduced(length_sums(torch.tensor([5, 9, 32, 2]), ended)), 2.0, 32.0)
    assert lengths == {"env/response_length_mean": 12.0, "env/response_length_min": 2.0,
                       "env/response_length_max": 32.0, "env/eos_fraction": 0.75}


def test_negative_kl_tokens_are_counted_by_type_and_padding_is_ignored():
    tokens = torch.tensor([[1, 2, 3, 4], [5, 1, 2, 0]])
    log_ratio = torch.tensor([[-0.1, -0.2, 0.3, -0.4], [-0.5, 0.1, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # the -9 sits on padding
    s = negative_kl_metrics(reduced(negative_kl_sums(log_ratio, mask, tokens, Pieces)))
    assert s["objective/negative_kl_tokens"] == 4  # word, punctuation, digit, byte
    assert s["objective/negative_kl_share"] == pytest.approx(4 / 7)
    assert s["objective/negative_kl_by_type/word"] == pytest.approx(0.25)
    assert s["objective/negative_kl_by_type/whitespace"] == 0.0
    assert s["objective/negative_kl_by_type/special_byte"] == pytest.approx(0.25)


def test_repeated_token_share():
    tokens = torch.tensor([[7, 7, 7, 8], [5, 6, 6, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # pairs inside the mask: row 0 (7,7) (7,7) (7,8); row 1 (5,6) (6,6); the last 6 is padding
    assert repeated_token_share(tokens, mask) == pytest.approx(3 / 5)


def metrics(kl_k1=1.0, stderr=0.1, reward=0.0, repeated=0.05):
    return {"objective/kl_k1": kl_k1, "objective/kl_k1_stderr": stderr, "objective/kl_full": 0.5,
            "env/reward_mean": reward, "env/repeated_token_share": repeated}


def test_negative_kl_warning_fires_beyond_rounding_and_sampling_noise_only():
    log = Log()
    failure_warnings(log, 0, metrics(kl_k1=-1e-7, stderr=1e-9), [])
    assert log.warnings == []  # policy still equal to its reference: rounding
    failure_warnings(log, 1, metrics(kl_k1=-0.2, stderr=0.1), [])
    assert log.warnings == []  # 2 standard errors below 0: sampling noise of an unbiased estimator
    failure_warnings(log, 3, metrics(kl_k1=-0.8, stderr=0.1), [])
    assert len(log.warnings) == 1 and "mean k1 KL is negative (-0.800, 8.0 standard errors" in log.warnings[0]


def test_kl_metrics_report_the_k1_standard_error():
    from types import SimpleNamespace

    from rlhf_engine.engine.rl.diagnostics import kl_metrics, kl_sums
    # Per-response k1 sums 1, 3, -1, 5: mean 2, population variance (1+1+9+9)/4 = 5, stderr sqrt(5/4).
    logprobs = torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 0.0], [3.0, 2.0]])
    rollout = SimpleNamespace(logprobs=logprobs, ref_logprobs=torch.zeros(4, 2), kl_full=torch.zeros(4, 2),
                              response_mask=torch.ones(4, 2))
    out = kl_metrics({**reduced(kl_sums(rollout)), "rows": 4.0})
    assert out["objective/kl_k1"] == pytest.approx(2.0) and out["objective/kl_k1_stderr"] == pytest.approx((5 / 4) ** 0.5)


def test_reward_hacking_warning_needs_rising_reward_and_collapsing_diversity():
    history = [metrics(reward=0.0, repeated=0.05)] * 5
    for reward, repeated, fires in ((1.0, 0.5, True), (1.0, 0.2, False), (-1.0, 0.5, False)):
        log = Log()
        failure_warnings(log, 9, metrics(reward=reward, repeated=repeated), history)
        assert bool(log.warnings) == fires, (reward, repeated)
        if fires:
            assert "likely reward hacking by degenerate repetition" in log.warnings[0]


def test_closing_summary_says_what_happened_and_what_to_do_next():
    from types import SimpleNamespace

    from rlhf_engine.engine.rl.diagnostics import closing_summary, kl_verdict
    cfg = SimpleNamespace(kl_target=6.0, model="runs/sft", max_steps=20, adaptive_kl=True)
    history = [{"env/reward_mean": float(i), "objective/kl": 2.0} for i in range(20)]
    lines = closing_summary(cfg, history, 0.05, "runs/ppo/checkpoint-000020")
    # k = 5: rewards 0..4 average 2, rewards 15..19 average 17; KL 2 is below 6 / 1.5.
    assert lines[0].startswith("ppo: reward 2.000 over the first 5 steps -> 17.000 over the last 5; KL 2.00")
    assert "below its target of 6: β is falling" in lines[0]
    assert "--adapter runs/ppo/checkpoint-000020" in lines[2] and "--resume auto --max-steps 40" in lines[3]
    assert kl_verdict(7.0, 6.0) == "near its target of 6" and kl_verdict(10.0, 6.0).startswith("above")
    assert "nothing pulls it back" in kl_verdict(10.0, 6.0, adaptive=False)
