"""The stdout line: printed on the step interval and, on a slow machine, at least every 30 s; its ETA is
the pace since the first line, not since start-up."""
import rlhf_engine.engine.training.logging as logging_module
from rlhf_engine.engine.training.logging import Logger


def test_lines_come_on_time_and_the_eta_ignores_start_up(tmp_path, capsys, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(logging_module.time, "time", lambda: clock["now"])
    log = Logger(str(tmp_path), True)
    printed = []
    for step, now, due in ((1, 100.0, True), (2, 101.0, False), (3, 140.0, False), (4, 141.0, True)):
        clock["now"] = now
        log.line(step, 10, {"loss": 1.0}, due=due)
        printed.append(capsys.readouterr().out)
    log.close()
    assert printed[0].startswith("step 1/10 | loss 1.0000 | elapsed 1m40s") and "eta" not in printed[0]
    assert printed[1] == ""  # not due, and only 1 s since the last line
    # 40 s without a line: printed although not due. Pace since the first line: 40 s for 2 steps = 20 s
    # per step, 7 steps left: 2m20s (since start-up it would have said 140/3 x 7 = 5m26s).
    assert printed[2].startswith("step 3/10") and printed[2].rstrip().endswith("eta 2m20s")
    assert printed[3].startswith("step 4/10")


def test_threads_per_rank_share_the_cores_unless_omp_num_threads_says(monkeypatch):
    import os

    import torch

    from rlhf_engine.engine.training.dist import set_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 16)
        assert set_threads(4) == 4 and torch.get_num_threads() == 4  # 16 cores, 4 ranks on this machine
        assert set_threads(32) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_threads(4) == 3
    finally:
        torch.set_num_threads(before)


def test_each_stage_says_its_thread_count_first(synthetic_pairs, tmp_path, capsys):
    from rlhf_engine.engine.training.dist import init_dist
    from rlhf_engine.engine.sft import SFTConfig, train
    pairs, tok = synthetic_pairs
    train(SFTConfig(model="tiny", tokenizer=tok, data=f"{pairs}/finetune", out=str(tmp_path), lora=None, seq_len=32,
                    batch_size=2, max_steps=1, eval_batches=1, save_every=0), init_dist("cpu"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("sft: ") and "threads per rank (OMP_NUM_THREADS)" in first
