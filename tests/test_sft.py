"""SFT stage: learning happens, exact resume, world-size invariance under torchrun, NaN skipping, errors."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_metrics

from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.model.lora import LoRAConfig
from rlhf_engine.engine.sft import SFTConfig, train

TINY = dict(model="tiny", seq_len=64, batch_size=4, lr=3e-3, warmup_steps=5, log_every=1, eval_every=0,
            eval_batches=2)


def sft_cfg(synthetic_pairs, out, **kw):
    pairs, tok = synthetic_pairs
    return SFTConfig(**{**TINY, "data": os.path.join(pairs, "finetune"), "tokenizer": tok, "out": str(out),
                        "lora": None, **kw})


def test_sft_loss_falls_on_the_synthetic_data(synthetic_pairs, tmp_path):
    metrics = train(sft_cfg(synthetic_pairs, tmp_path, max_steps=40, save_every=0), init_dist("cpu"))
    losses = read_metrics(tmp_path, "train/loss")
    first, last = sum(losses[s] for s in range(3)) / 3, sum(losses[s] for s in range(37, 40)) / 3
    assert last < 0.6 * first, (first, last)
    assert metrics["eval/loss"] < 0.7 * first
    assert os.path.exists(tmp_path / "checkpoint-000040" / "model.safetensors")
    assert os.path.isdir(tmp_path / "tb") and os.listdir(tmp_path / "tb")


def checkpoints_equal_run(synthetic_pairs, tmp_path, **kw):
    """Run 8 steps straight, and 4 + resume 4; return both loss curves."""
    full = tmp_path / "full"
    train(sft_cfg(synthetic_pairs, full, max_steps=8, save_every=4, **kw), init_dist("cpu"))
    part = tmp_path / "part"
    train(sft_cfg(synthetic_pairs, part, max_steps=8, save_every=4, **kw), init_dist("cpu"))
    # Throw away everything after step 4, as if the run had died there, and resume.
    import shutil
    shutil.rmtree(part / "checkpoint-000008")
    (part / "metrics.jsonl").unlink()
    torch.manual_seed(12345)  # the resumed process starts from a different RNG state
    train(sft_cfg(synthetic_pairs, part, max_steps=8, save_every=4, resume="auto", **kw), init_dist("cpu"))
    return read_metrics(full, "train/loss"), read_metrics(part, "train/loss")


def test_resume_equals_uninterrupted_run_bit_for_bit(synthetic_pairs, tmp_path):
    full, resumed = checkpoints_equal_run(synthetic_pairs, tmp_path)
    assert sorted(resumed) == [4, 5, 6, 7]
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)


def test_resume_with_lora_dropout_restores_the_rng(synthetic_pairs, tmp_path):
    # LoRA on a random base is refused, so start from a saved full checkpoint.
    base = tmp_path / "base"
    train(sft_cfg(synthetic_pairs, base, max_steps=1, save_every=0), init_dist("cpu"))
    full, resumed = checkpoints_equal_run(synthetic_pairs, tmp_path, model=str(base / "checkpoint-000001"),
                                          lora=LoRAConfig(dropout=0.3, targets=("all-linear",)))
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)


def test_nan_steps_are_skipped_then_stop_the_run(synthetic_pairs, tmp_path, monkeypatch):
    import rlhf_engine.engine.sft as sft
    calls = {"n": 0}
    real = sft.CausalLMLoss.forward

    def flaky(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] in (2, 3) or calls["n"] >= 6 else out
    monkeypatch.setattr(sft.CausalLMLoss, "forward", flaky)
    with pytest.raises(RuntimeError, match="3 consecutive non-finite steps"):
        train(sft_cfg(synthetic_pairs, tmp_path, max_steps=20, save_every=0, max_bad_steps=3), init_dist("cpu"))
    losses = read_metrics(tmp_path, "train/loss")
    skipped = read_metrics(tmp_path, "train/skipped_steps")
    assert sorted(losses) == [0, 3, 4] and skipped == {1: 1, 2: 2, 5: 1, 6: 2, 7: 3}
    assert all(v == v for v in losses.values())  # no NaN ever reached the weights


def free_port() -> int:
    """A port no one listens on now (other test runs on this machine launch torchrun too)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(free_port()), os.path.join(ROOT, "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_world_size_and_accumulation_do_not_change_the_loss_curve(synthetic_pairs, tmp_path):
    pairs, tok = synthetic_pairs
    common = ["sft", "--model", "tiny", "--tokenizer", tok, "--data", os.path.join(pairs, "finetune"), "--no-lora",
              "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--max-steps", "5", "--log-every", "1",
              "--eval-every", "0", "--save-every", "0", "--eval-batches", "1"]
    runs = {"2x2": (2, ["--batch-size", "2"]), "1x4": (1, ["--batch-size", "4"]),
            "1x2x2": (1, ["--batch-size", "2", "--grad-accum", "2"])}
    curves, evals = {}, {}
    for name, (n, extra) in runs.items():
        out = torchrun(n, *common, *extra, "--out", str(tmp_path / name))
        assert out.returncode == 0, out.stderr[-3000:]
        curves[name] = read_metrics(tmp_path / name, "train/loss")
        evals[name] = read_metrics(tmp_path / name, "eval/loss")[5]
    for name in ("2x2", "1x2x2"):
        for step, loss in curves["1x4"].items():
            assert abs(curves[name][step] - loss) <= 1e-5 * abs(loss), (name, step, curves[name][step], loss)
    assert curves["1x4"][4] < curves["1x4"][0]
    # Held-out loss too: --eval-batches counts micro-batches of --batch-size over all ranks, not per rank.
    assert abs(evals["2x2"] - evals["1x2x2"]) <= 1e-5 * evals["1x2x2"], evals


def test_bad_flags_and_files_are_one_line_errors(synthetic_pairs, tmp_path):
    pairs, tok = synthetic_pairs
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "sft", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    base = ["--tokenizer", tok, "--out", str(tmp_path), "--seq-len", "64"]
    out = run("--model", "tiny", "--no-lora", "--data", str(tmp_path / "nope.parquet"), *base)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nope.parquet" in out.stderr
    out = run("--model", "tiny", "--data", pairs + "/finetune", "--batch-size", "0", *base)
    assert out.returncode == 2 and out.stderr.strip() == "error: --batch-size must be >= 1, got 0"
    out = run("--model", "tiny", "--data", pairs + "/finetune", *base)
    assert out.returncode == 2 and "LoRA on a random base" in out.stderr
    out = run("--model", "tiny", "--data", pairs + "/finetune", "--no-lora", "--resume", str(tmp_path / "x"), *base)
    assert out.returncode == 2 and "no trainer_state.pt there" in out.stderr


@pytest.mark.slow
def test_compiled_lora_sft_equals_eager_within_round_off(synthetic_pairs, tmp_path):
    """--compile traces the log-probs' custom Function (the frozen head's precomputed gradient) with no graph
    break: the loss and gradient-norm curves equal eager's within round-off. Dropout 0, so both draw nothing (the
    compiled graph draws its masks from another generator) and the LoRA update is the plain expression; its
    Function under compile is tests/test_lora_update.py's slow test."""
    import torch._dynamo
    base = tmp_path / "base"
    train(sft_cfg(synthetic_pairs, base, max_steps=1, save_every=0), init_dist("cpu"))
    lora = LoRAConfig(dropout=0.0, targets=("q_proj", "v_proj"))
    curves = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        train(sft_cfg(synthetic_pairs, tmp_path / str(compiled), model=str(base / "checkpoint-000001"), lora=lora,
                      max_steps=4, save_every=0, compile=compiled), init_dist("cpu"))
        curves[compiled] = {key: read_metrics(tmp_path / str(compiled), key)
                            for key in ("train/loss", "train/grad_norm")}
        if compiled:
            assert not torch._dynamo.utils.counters["graph_break"]
    for key, eager in curves[False].items():
        assert sorted(curves[True][key]) == [0, 1, 2, 3]
        for step, value in eager.items():
            assert abs(curves[True][key][step] - value) <= 1e-4 * max(1.0, abs(value)), (key, step, curves)
    assert min(curves[False]["train/grad_norm"].values()) > 0.1  # gradients reach the adapters
