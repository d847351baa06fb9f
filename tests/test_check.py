"""`train.py check`: a healthy tiny model passes every invariant (exit 0); each invariant, broken on
purpose (a pad leak, a forgetful KV cache, a stale sampler adapter, a reference that keeps its adapter,
the score read at the last column, splits that share a question, a wrong 8-bit kernel), turns its own
row to FAIL and the exit code to 1."""
import contextlib
import copy
import os

import pytest
import torch

import train
from conftest import shared_file
from rlhf_engine.data.pairs_io import PairWriter
from rlhf_engine.engine import check
from rlhf_engine.engine.weights.adapters import save_adapter
from rlhf_engine.engine.weights.hf_folder import save_model_folder
from rlhf_engine.engine.weights.load import load_checkpoint
from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora, lora_layers
from rlhf_engine.engine.merge import merge
from rlhf_engine.engine.model.llama import LLaMA


def write_splits(folder, questions_by_split):
    """A `prepare`-style folder: {split: [(qid, question), ...]} -> folder/split/pairs.parquet."""
    for split, questions in questions_by_split.items():
        os.makedirs(folder / split)
        writer = PairWriter(str(folder / split / "pairs.parquet"))
        for qid, question in questions:
            writer.write(dict(qid=qid, question=question, date="2024/01/01", metadata=["q", "https://site", "cc"],
                              response_j="keep them in an airtight container", response_k="why"))
        writer.close()
    return str(folder)


@pytest.fixture(scope="module")
def run_dir(tiny_tokenizer_path, tmp_path_factory):
    """A tiny base, a LoRA adapter on it with non-zero lora_b, an RM adapter (score head beside it)
    and the same RM merged, and four disjoint splits."""
    from rlhf_engine.engine.training.train_state import write_stage_model
    folder = tmp_path_factory.mktemp("check")
    cfg = ModelConfig.preset("tiny", vocab_size=300)
    torch.manual_seed(0)
    base = str(folder / "base")
    save_model_folder(LLaMA(cfg).init_weights(std=0.15), base, tokenizer=tiny_tokenizer_path)
    lora = LoRAConfig(r=4, targets=("q_proj", "v_proj", "down_proj"), dropout=0.0)
    g = torch.Generator().manual_seed(1)
    for head, name in (("lm", "adapter"), ("score", "rm")):
        net = apply_lora(load_checkpoint(base, head=head), lora)
        with torch.no_grad():
            for p in [layer.lora_b for _, layer in lora_layers(net)] + ([net.score.weight] if head == "score" else []):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if head == "lm":
            save_adapter(net, lora, str(folder / name), base_model=base)
        else:
            os.makedirs(folder / name)
            write_stage_model(str(folder / name), net, lora, tiny_tokenizer_path, base_model=base)
    merged = merge(base, str(folder / "rm"), str(folder / "rm-merged"))
    questions = ["how do i store coffee beans", "why does my bike chain skip gears", "what is a good tokenizer",
                 "how do i keep them away from light", "is byte pair encoding good for small models",
                 "why does the derailleur cable need tension", "what is the best way to store beans",
                 "question about the answer", "thanks for the answer"]
    data = write_splits(folder / "pairs", {"finetune": [(1, questions[0]), (2, questions[1])],
                                           "reward": [(3, questions[2]), (4, questions[3])],
                                           "rl": [(5, questions[4]), (6, questions[5]), (9, questions[8])],
                                           "evaluation": [(7, questions[6]), (8, questions[7])]})
    return dict(base=base, adapter=str(folder / "adapter"), rm_adapter=str(folder / "rm"), rm=merged, data=data)


def run_check(capsys, *args):
    """(exit code, {invariant: (measured, PASS/FAIL)}, first line) of `train.py check *args`."""
    code = train.main(["check", "--device", "cpu", *args])
    lines = capsys.readouterr().out.splitlines()
    rows = {}
    for line in lines[3:]:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 4:
            rows[cells[0]] = (float(cells[1]), cells[3])
    return code, rows, lines[0]


def check_table(capsys, run_dir, *extra, rm="rm"):
    """run_check on run_dir: the base, its adapter, an RM and the splits, 3 prompts."""
    return run_check(capsys, "--model", run_dir["base"], "--adapter", run_dir["adapter"], "--reward-model",
                     run_dir[rm], "--data", run_dir["data"], "--prompts", "3", *extra)


SPLITS_ROW = "splits share no question id (evaluation, finetune, reward, rl)"
EVERY_ROW = {"left padding changes no log-prob", "batch composition changes no row", "KV-cache decode = full forward",
             "sampler log-probs = trainer's (adapter on)", "sampler log-probs = trainer's (adapters off)",
             "disable_lora = base checkpoint", "sampler runs the trainer's adapter",
             "reward read at the last real token", "RM score: padded batch = rows alone",
             "pairwise loss unchanged by padding", SPLITS_ROW, "splits share no question text"}
INT8_ROW = "8-bit linear = dequantised reference (14 layers)"  # 2 blocks x 7 linears; the LM head stays float


@pytest.mark.parametrize("rm", ["rm", "rm_adapter"])
def test_a_healthy_model_passes_every_invariant(run_dir, capsys, rm):
    code, rows, mode = check_table(capsys, run_dir, rm=rm)
    assert mode.startswith("check: device cpu, dtype fp32, 8-bit off; 3 prompts from ")
    assert set(rows) == EVERY_ROW
    assert all(result == "PASS" for _, result in rows.values()), rows
    assert code == 0
    assert rows[SPLITS_ROW][0] == 0 and rows["sampler runs the trainer's adapter"][0] == 0


def test_bf16_check_holds_the_sampler_to_ppos_bar(run_dir, capsys):
    """In bf16 check samples and scores through PPO's own calls under PPO's autocast, and holds the gap to
    the bar PPO warns at (one table): real bf16 rounding shows (far above fp32's 1e-4) and stays below it."""
    from rlhf_engine.engine.rl.invariants import logprob_tolerance
    code, rows, mode = check_table(capsys, run_dir, "--dtype", "bf16")
    assert mode.startswith("check: device cpu, dtype bf16, 8-bit off")
    assert set(rows) == EVERY_ROW and code == 0, rows
    gap = rows["sampler log-probs = trainer's (adapter on)"][0]
    assert 1e-4 < gap < 0.25  # the tiny model's logits are small: ~0.06 at worst
    assert logprob_tolerance(torch.device("cpu"), "bf16", decode=True) == 1.0  # a real model's (the slow test below)
    assert logprob_tolerance(torch.device("cpu"), "bf16") == 0.25  # one forward computed two ways


def real_check(capsys, *flags):
    """run_check on SmolLM2's GGUF with 64 prompts (skipped without ../shared/data)."""
    model = shared_file("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return run_check(capsys, "--model", model, "--prompts", "64", *flags)


@pytest.mark.slow
@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="bf16 is emulated on this CPU (hours)")
def test_bf16_check_passes_on_a_real_model(capsys):
    """In bf16 the decode and the full forward round at different places through 30 layers, ending in SmolLM2's
    logits of 20-30 held to steps of 1/8: over 64 rows of 64 sampled tokens the worst token measured 0.43 nats
    (0.26 over 32 rows; 0.36-0.55 on real questions), which a 0.25 bar failed (check exit 1, and a warning on
    PPO's first step). A healthy checkpoint must pass in bf16 as in fp32 (a minute or two; skipped without
    ../shared/data)."""
    code, rows, mode = real_check(capsys, "--dtype", "bf16", "--max-new-tokens", "64")
    assert mode.startswith("check: device cpu, dtype bf16, 8-bit off; 64 built-in prompts")
    assert code == 0 and all(result == "PASS" for _, result in rows.values()), rows
    assert rows["sampler log-probs = trainer's"][0] > 0.25  # bf16's real rounding: above one forward's bar


@pytest.mark.slow
def test_fp32_check_passes_on_a_real_model_with_real_questions(capsys, tmp_path):
    """In fp32 a real question alone multiplies its few rows through MKL and the padded batch of 64 through
    oneDNN, and SmolLM2's logits of 15-36 carry that rounding through 30 layers: the padding row measured
    1.1e-4 on se-coffee's questions (1.7e-4 on every dump's; 5.7e-4 with an SFT adapter, on a token of log p -13),
    which the old 1e-4 bar failed."""
    coffee = shared_file("se-coffee", "Posts.xml")
    assert train.main(["prepare", "--posts", coffee, "--out", str(tmp_path / "pairs"), "--splits", "rl=1.0"]) == 0
    capsys.readouterr()  # prepare's own table
    code, rows, mode = real_check(capsys, "--data", str(tmp_path / "pairs"), "--max-new-tokens", "16")
    assert mode.startswith("check: device cpu, dtype fp32, 8-bit off; 64 prompts from ")
    assert code == 0 and all(result == "PASS" for _, result in rows.values()), rows
    assert 1e-5 < rows["left padding changes no log-prob"][0] < 1e-3  # real round-off, far below a leak


def test_an_8bit_base_passes_and_reports_its_kernel(run_dir, capsys):
    code, rows, mode = check_table(capsys, run_dir, "--load-in-8bit")
    assert "8-bit on (kernel " in mode
    assert rows[INT8_ROW][1] == "PASS"
    assert rows[INT8_ROW][0] < 3e-2  # 0 where the kernel is the reference itself (no AVX-512)
    assert code == 0, rows


def test_a_row_leak_fails_left_padding(run_dir, capsys, monkeypatch):
    """Varlen attention that lets a row see the rows packed before it (the row lengths ignored: the
    whole batch's real tokens attended as one sequence), the classic packing bug."""
    import rlhf_engine.engine.model.llama as model_module
    from rlhf_engine.engine.model.varlen import plan_rows
    honest = model_module.attend_rows
    monkeypatch.setattr(model_module, "attend_rows",
                        lambda q, k, v, groups: honest(q, k, v, plan_rows((q.shape[0],), 1, q.device)))
    code, rows, _ = check_table(capsys, run_dir)
    assert rows["left padding changes no log-prob"][1] == "FAIL"
    assert rows["left padding changes no log-prob"][0] > 1e-2
    assert code == 1


def test_a_forgetful_cache_fails_decode(run_dir, capsys, monkeypatch):
    """Decode steps (one token against the cache) store zeros instead of their own keys and values."""
    from rlhf_engine.engine.model.llama import KVCache
    honest = KVCache.update

    def forgetful(self, layer, k, v):
        if k.shape[2] == 1:
            k, v = torch.zeros_like(k), torch.zeros_like(v)
        return honest(self, layer, k, v)
    monkeypatch.setattr(KVCache, "update", forgetful)
    code, rows, _ = check_table(capsys, run_dir)
    assert rows["KV-cache decode = full forward"][1] == "FAIL"
    assert rows["left padding changes no log-prob"][1] == "PASS"  # no cache there: the bug is located
    assert code == 1


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_stale_sampler_adapter_fails(run_dir, capsys, monkeypatch, dtype):
    """verl#7495: the sampler is a copy the trained adapter never reached (it still holds lora_b = 0). The
    copy goes in where PPO samples (rollout.sample_rows' generate), the very call check measures."""
    import rlhf_engine.engine.rl.rollout as rollout_module
    real = rollout_module.generate

    def stale_generate(model, *args, **kwargs):
        sampler = copy.deepcopy(model)
        with torch.no_grad():
            for _, layer in lora_layers(sampler):
                layer.lora_b.zero_()
        return real(sampler, *args, **kwargs)
    monkeypatch.setattr(rollout_module, "generate", stale_generate)
    code, rows, _ = check_table(capsys, run_dir, "--dtype", dtype)
    assert rows["sampler runs the trainer's adapter"][1] == "FAIL"
    assert rows["sampler log-probs = trainer's (adapter on)"][1] == "FAIL"
    assert code == 1


def test_a_reference_that_keeps_its_adapter_fails(run_dir, capsys, monkeypatch):
    """disable_lora that disables nothing: PPO's reference would be the policy, and the KL always 0."""
    monkeypatch.setattr(check, "disable_lora", lambda model: contextlib.nullcontext(model))
    code, rows, _ = check_table(capsys, run_dir)
    assert rows["disable_lora = base checkpoint"][1] == "FAIL"
    assert code == 1


@pytest.mark.parametrize("row", ["reward read at the last real token", "RM score: padded batch = rows alone"])
def test_a_score_read_at_the_last_column_fails(run_dir, capsys, monkeypatch, row):
    """The reward read at the last column (a padding slot for every shorter row), in PPO's reward
    function or in the RM trainer's scorer (both in rl/reward.py)."""
    import rlhf_engine.engine.rl.reward as reward

    def last_column(mask):
        return torch.full((mask.shape[0],), mask.shape[1] - 1, device=mask.device)
    monkeypatch.setattr(reward, "last_token_index", last_column)
    code, rows, _ = check_table(capsys, run_dir)
    assert rows[row][1] == "FAIL"
    assert code == 1


def test_splits_that_share_a_question_fail(run_dir, capsys, tmp_path):
    """rl and evaluation hold question 5 (same id and text), reward repeats a question's text under
    another id: one shared id, two shared texts."""
    data = write_splits(tmp_path / "pairs", {"finetune": [(1, "how do i store coffee beans")],
                                             "reward": [(3, "what is a good tokenizer"), (4, "how do i store coffee beans")],
                                             "rl": [(5, "why does my bike chain skip gears")],
                                             "evaluation": [(5, "why does my bike chain skip gears")]})
    code, rows, _ = check_table(capsys, {**run_dir, "data": data})
    assert rows[SPLITS_ROW] == (1.0, "FAIL")
    assert rows["splits share no question text"] == (2.0, "FAIL")
    assert code == 1


def test_a_wrong_8bit_kernel_fails(run_dir, capsys, monkeypatch):
    """Every 8-bit kernel returns 1.1 x the right output."""
    from rlhf_engine.kernels import int8_matmul
    for impl in int8_matmul.IMPLS:
        monkeypatch.setitem(int8_matmul._FORWARD, impl,
                            lambda x, q, scale, threshold: int8_matmul.reference(x, q, scale).float() * 1.1)
    code, rows, _ = check_table(capsys, run_dir, "--load-in-8bit")
    assert rows[INT8_ROW][1] == "FAIL"
    assert rows[INT8_ROW][0] == pytest.approx(0.1, rel=1e-2)
    assert code == 1


def test_a_missing_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert train.main(["check", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --model ") and "no such file or folder" in err


@pytest.mark.parametrize("rm", ["rm", "rm_adapter"])
def test_the_reward_model_is_stored_in_8bit_under_load_in_8bit(run_dir, capsys, monkeypatch, rm):
    """check loads its reward model through the one RM loader (rl/reward.py), which honours --load-in-8bit:
    before, check's own loader ignored the flag and measured a float RM beside an 8-bit policy."""
    import rlhf_engine.engine.check as check_module
    from rlhf_engine.engine.model.int8 import Int8Linear
    loaded = []
    real = check_module.load_reward_network

    def spy(*args, **kwargs):
        net, adapter = real(*args, **kwargs)
        loaded.append(net)
        return net, adapter
    monkeypatch.setattr(check_module, "load_reward_network", spy)
    code, rows, _ = check_table(capsys, run_dir, "--load-in-8bit", rm=rm)
    (net,) = loaded
    assert any(isinstance(m, Int8Linear) for m in net.modules())
    assert rows["reward read at the last real token"][1] == "PASS" and code == 0
