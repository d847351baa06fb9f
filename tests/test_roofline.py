"""engine/training/roofline.py: FLOP and byte accounting on hand-computed configs (4·N for a frozen base, 6·N for full
fine-tuning, attention per attended key), the PPO step report's fractions, and the measured peaks."""
import math

import pytest
import torch

from rlhf_engine.engine.training import roofline
from rlhf_engine.engine.model.config import ModelConfig

# dim 8, 2 layers, 2 heads of 4, hidden 16, vocab 10. Per layer: q, k, v, o = 4 x 8 x 8 = 256 weights; the MLP
# 3 x 8 x 16 = 384. N = 2 x 640 = 1280; the LM head 10 x 8 = 80.
SMALL = ModelConfig(dim=8, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=16, vocab_size=10, max_seq_len=64)


def test_flops_by_hand():
    assert roofline.layer_matmul_params(SMALL) == 1280
    assert roofline.causal_attended([5]) == 15 and roofline.causal_attended([2, 3]) == 3 + 6
    # One row of 5 tokens, the head on 3 of them: 2N·5 + 2·80·3 + 4·dim·layers·15 attended keys.
    assert roofline.forward_flops(SMALL, 5, 3, 15) == 2 * 1280 * 5 + 2 * 80 * 3 + 4 * 8 * 2 * 15 == 14240
    # Frozen base (LoRA): forward + input gradients = 4N; attention 3x its forward either way.
    assert roofline.training_flops(SMALL, 5, 3, 15, full=False) == 4 * 1280 * 5 + 4 * 80 * 3 + 3 * 960 == 29440
    # Full fine-tuning adds the weight gradients: 6N.
    assert roofline.training_flops(SMALL, 5, 3, 15, full=True) == 6 * 1280 * 5 + 6 * 80 * 3 + 3 * 960 == 42720
    # SFT: the LM head on all 5 positions of a packed row, per token.
    assert roofline.training_flops_per_token(SMALL, 5, full=True) == (6 * 1280 * 5 + 6 * 80 * 5 + 3 * 960) / 5
    per_token_rm = roofline.training_flops_per_token(SMALL, 5, full=False, lm_head=False)
    assert per_token_rm == (4 * 1280 * 5 + 3 * 960) / 5


def test_llama_60m_matches_the_issue_figures():
    cfg = ModelConfig.preset("llama-60m")
    assert roofline.layer_matmul_params(cfg) == 25_296_896  # "25.3M non-embedding matmul parameters"
    # 16 rows of 64 prompt + 48 response tokens; attention left out as in the issue's 116 GFLOP estimate
    assert abs(roofline.forward_flops(cfg, 16 * 112, 16 * 48, 0) / 1e9 - 116) < 1


def test_decode_bytes_and_weight_bytes():
    # Every weight once per step, plus keys and values: 2 x layers x kv heads x head_dim x bytes per slot read.
    assert roofline.decode_bytes(SMALL, model_bytes=1000, steps=3, kv_reads=7, kv_element_bytes=4) == \
        1000 * 3 + 2 * 2 * 2 * 4 * 4 * 7
    from rlhf_engine.engine.model.llama import LLaMA
    model = LLaMA(SMALL)
    # The layers' linears and the LM head, float32; not the embedding (a row lookup) nor the norms (vectors).
    assert roofline.weight_bytes(model) == (1280 + 80) * 4


def test_step_report_fractions_by_hand():
    # Two rows: prompts 3 and 2 tokens, responses 2 and 1.
    seconds = {"generate": 2.0, "policy_forward": 0.5, "reference_forward": 0.5, "update": 4.0}
    report = roofline.ppo_step_report(SMALL, [3, 2], [2, 1], seconds, update_passes=2.0, full=False, peak=1000.0,
                                      peak_name="fp32", bandwidth=100.0, model_bytes=50, kv_element_bytes=4)
    attended = 15 + 6  # rows of 5 and 3 real tokens
    fwd = 2 * 1280 * 8 + 2 * 80 * 3 + 4 * 8 * 2 * attended
    train = 4 * 1280 * 8 + 4 * 80 * 3 + 12 * 8 * 2 * attended
    kv_reads = (3 + 4) + 2  # row 0 decodes at 3 then 4 cached slots; row 1 at 2
    gen_bytes = 50 * 2 + 2 * 2 * 2 * 4 * 4 * kv_reads
    m = report.metrics
    assert math.isclose(m["perf/score_peak_frac"], 2 * fwd / 1.0 / 1000)
    assert math.isclose(m["perf/update_peak_frac"], 2 * train / 4.0 / 1000)
    assert math.isclose(m["perf/generate_bandwidth_frac"], gen_bytes / 2.0 / 100)
    assert report.line.startswith(f"update {m['perf/update_peak_frac']:.0%} of fp32 peak")


def test_measured_peaks_are_cached_and_plausible():
    peaks = roofline.measured_peaks("cpu")
    assert roofline.measured_peaks("cpu") is peaks  # once per process
    # bf16 down to 1e8: a CPU without native bf16 (AVX2 only) emulates it at ~1 GFLOP/s
    assert 1e9 < peaks.fp32 < 1e15 and 1e8 < peaks.bf16 < 1e15 and 1e8 < peaks.bandwidth < 1e13
    assert roofline.matmul_peak(peaks, "bf16") == peaks.bf16 and roofline.matmul_peak(peaks, "fp32") == peaks.fp32
    if math.isfinite(peaks.int8):
        assert roofline.matmul_peak(peaks, "bf16", load_in_8bit=True) == peaks.int8


@pytest.mark.parametrize("full", [False, True])
def test_mfu_uses_4n_for_a_frozen_base(full):
    peak = roofline.matmul_peak(roofline.measured_peaks("cpu"), "fp32")
    per_token = roofline.training_flops_per_token(SMALL, 5, full=full)
    assert math.isclose(roofline.mfu(100.0, per_token, torch.device("cpu"), "fp32"), 100 * per_token / peak)


def test_padding_share_by_hand():
    lengths = [3, 5, 2, 6]  # real tokens per row: 16
    assert roofline.padding_share(lengths, width=8) == pytest.approx(1 - 16 / 32)
    assert roofline.padding_share(lengths, width=6) == pytest.approx(1 - 16 / 24)
    assert roofline.padding_share([], width=6) == 0.0
