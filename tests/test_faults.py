"""Runs that cannot be corrupted: the fault suite (docs/RELIABILITY.md states what it promises).

Fast cases: one run per --out (a second run refuses at once; ranks die with their launcher), logs that
read as one clean run after a resume, no partial checkpoint ever taken by `--resume auto`, and every
refused input is exit 2 with one stderr line naming the file, row or flag. Marked slow: SFT and RM runs
(PPO too, once its lock and logger are wired) SIGKILLed at random moments, mid-save and mid-rotation,
resumed with --resume auto until they finish, and compared with an uninterrupted run value for value.

    .venv/bin/python -m pytest -q tests/test_faults.py             # fast cases
    .venv/bin/python -m pytest -q tests/test_faults.py -m slow -s  # the kill-and-resume suite, with figures
"""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, shared_file
from test_sft import free_port

import train as cli
from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.training.train_state import (LOCK, list_checkpoints, lock_run_folder, load_trainer_state,
                                                     resolve_resume, save_training_checkpoint)

TIMING = ("time/", "perf/")  # the only fields two equal runs may differ in


def sft_args(synthetic_pairs, out, *extra):
    pairs, tok = synthetic_pairs
    return ["sft", "--model", "tiny", "--tokenizer", tok, "--data", os.path.join(pairs, "finetune"), "--no-lora",
            "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1",
            "--eval-every", "0", "--eval-batches", "1", "--out", str(out), *extra]


def rm_args(synthetic_pairs, out, *extra):
    pairs, tok = synthetic_pairs
    return ["rm", "--model", "tiny", "--tokenizer", tok, "--data", os.path.join(pairs, "reward"), "--no-lora",
            "--max-length", "128", "--batch-size", "2", "--lr", "3e-3", "--log-every", "1", "--eval-every", "0",
            "--eval-batches", "2", "--out", str(out), *extra]


def refused(capsys, argv, *names):
    """train.main(argv) must exit 2 with one stderr line that names each of `names`; returns the line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert "weights_only=False" not in err
    return lines[0]


def rows(out):
    """metrics.jsonl without its timing fields."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)} for line in f]


def torchrun(n, port, *args, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
           os.path.join(ROOT, "train.py"), *args]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# ---- 1. one run per --out --------------------------------------------------------------------------

HOLD = ("import sys; sys.path.insert(0, {root!r})\n"
        "import train\nfrom rlhf_engine.engine.training.dist import init_dist\n"
        "from rlhf_engine.engine.training.train_state import lock_run_folder\n"
        "lock_run_folder(init_dist('cpu'), {out!r}); print('locked', flush=True); sys.stdin.read()")


def test_a_second_run_on_a_folder_refuses_and_a_killed_holder_leaves_no_stale_lock(synthetic_pairs, tmp_path,
                                                                                    capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, out=str(out))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = refused(capsys, sft_args(synthetic_pairs, out, "--max-steps", "1"), out, f"pid {holder.pid}")
        assert "in use by another run" in line
    finally:
        holder.kill()  # SIGKILL: no chance to unlock; the kernel drops the lock with the process
        holder.wait()
    assert lock_run_folder(init_dist("cpu"), str(out)) is not None
    assert open(out / LOCK).read().strip() == str(os.getpid())


def test_ranks_die_with_their_launcher_and_a_user_error_stops_every_rank(synthetic_pairs, tmp_path):
    out = tmp_path / "run"
    launcher = torchrun(2, free_port(), *sft_args(synthetic_pairs, out, "--max-steps", "100000", "--save-every", "0",
                                           "--log-every", "1000"))
    ranks = []
    try:
        wait_for(lambda: (out / LOCK).exists() and (out / LOCK).read_text().strip(), 120, "rank 0 to lock --out")
        ranks = children(launcher.pid)
        assert len(ranks) == 2 and int((out / LOCK).read_text()) in ranks

        # A second torchrun on the same folder: every rank prints the same one line and exits 2.
        second = torchrun(2, free_port(), *sft_args(synthetic_pairs, out, "--max-steps", "1"))
        output = second.communicate(timeout=120)[0]
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 2 and errors[0] == errors[1], output
        assert f"pid {(out / LOCK).read_text().strip()}" in errors[0]
        # (torchrun stops the other ranks once one has failed, so its summary may list one exit code)
        assert "exitcode  : 2" in output and os.path.join(ROOT, "engine") not in output  # no rank's traceback

        launcher.kill()  # SIGKILL: torchrun cannot pass anything on to its ranks
        launcher.wait()
        wait_for(lambda: not any(alive(pid) for pid in ranks), 10, f"ranks {ranks} to die with their launcher")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in ranks + children(launcher.pid):  # what a failed test would leave training on
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_out_that_is_a_file_or_read_only_is_one_line(synthetic_pairs, tmp_path, capsys, monkeypatch):
    file = tmp_path / "file"
    file.write_text("x")
    refused(capsys, sft_args(synthetic_pairs, file, "--max-steps", "1"), f"--out {file} is a file")

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr("rlhf_engine.engine.training.train_state.os.makedirs", read_only)
    line = refused(capsys, sft_args(synthetic_pairs, tmp_path / "ro", "--max-steps", "1"), tmp_path / "ro")
    assert "Read-only file system" in line


# ---- 2. resume bookkeeping ------------------------------------------------------------------------

def test_logs_after_a_resume_read_as_one_clean_run(synthetic_pairs, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert cli.main(sft_args(synthetic_pairs, out, "--max-steps", "6", "--save-every", "2", "--keep", "10")) == 0
    uninterrupted = rows(out)
    # The run ended with rows for steps 4, 5 and the final evaluation; resuming from step 4 re-runs them.
    assert cli.main(sft_args(synthetic_pairs, out, "--max-steps", "6", "--save-every", "2", "--keep", "10",
                             "--resume", str(out / "checkpoint-000004"))) == 0
    assert rows(out) == uninterrupted
    assert [r["step"] for r in uninterrupted] == [0, 1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [0, 1, 2, 3, 4, 5]
    assert [e.value for e in losses] == pytest.approx([r["train/loss"] for r in uninterrupted[:6]], rel=1e-6)
    capsys.readouterr()


def test_partial_checkpoints_of_killed_runs_are_removed_at_start(tmp_path):
    def folder(name, trainer_state=True):
        (tmp_path / name).mkdir(parents=True)
        if trainer_state:
            (tmp_path / name / "trainer_state.pt").write_bytes(b"x")
    folder("checkpoint-000001")
    folder(".checkpoint-000002.tmp-abc123", trainer_state=False)  # a save killed midway
    folder(".checkpoint-000001.old-xyz/checkpoint-000001")  # a save killed while replacing a folder
    folder(".checkpoint-000003.trash-q1w2/checkpoint-000003")  # a rotation killed before its delete
    folder(".keep-me", trainer_state=False)
    lock_run_folder(init_dist("cpu"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".keep-me", LOCK, "checkpoint-000001"]


def test_a_rotation_killed_midway_leaves_no_checkpoint_that_resume_takes(tmp_path, monkeypatch):
    dist = init_dist("cpu")

    def write(folder):
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"x" * 10)
    for step in (1, 2):
        save_training_checkpoint(dist, str(tmp_path), step, write, {}, keep=2)

    def killed_midway(path, *a, **k):  # deletes a file or two, then the process "dies"
        for root, _, files in os.walk(path):
            for name in files:
                if name == "model.safetensors":
                    os.remove(os.path.join(root, name))
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(dist, str(tmp_path), 3, write, {}, keep=2)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]
    assert not (tmp_path / "checkpoint-000001").exists()
    assert resolve_resume(dist, "auto", str(tmp_path)) == str(tmp_path / "checkpoint-000003")
    lock_run_folder(dist, str(tmp_path))  # the next run's start clears the hidden remains
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".checkpoint")) == []


def test_a_full_disk_during_a_save_names_the_last_good_checkpoint(synthetic_pairs, tmp_path, capsys, monkeypatch):
    import rlhf_engine.engine.training.train_state as train_state
    real, saves = train_state.write_stage_model, []

    def fill_up(folder, *a, **k):
        saves.append(folder)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(folder, "model.safetensors"))
        return real(folder, *a, **k)
    monkeypatch.setattr(train_state, "write_stage_model", fill_up)
    out = tmp_path / "run"
    line = refused(capsys, sft_args(synthetic_pairs, out, "--max-steps", "6", "--save-every", "2"),
                   f"disk full while saving {out / 'checkpoint-000004'}",
                   f"the last good checkpoint is {out / 'checkpoint-000002'}")
    assert "--resume auto" in line
    assert sorted(os.listdir(out)) == [LOCK, "checkpoint-000002", "metrics.jsonl", "tb"]  # no half-written folder


# ---- 3 and 4. refused inputs: exit 2, one line naming the file, row or flag -----------------------------

def pairs_file(path, rows=3, **columns):
    table = {"qid": list(range(rows)), "question": [f"q{i}?" for i in range(rows)], "date": ["2020/01/01"] * rows,
             "metadata": [["u", "s", "l"]] * rows, "response_j": ["good"] * rows, "response_k": ["bad"] * rows}
    pq.write_table(pa.table({**table, **columns}), path)
    return path


def test_a_posts_file_without_usable_rows_is_refused(tmp_path, capsys):
    path = tmp_path / "Posts.xml"
    path.write_text('<?xml version="1.0"?>\n<posts>\n' + '  <row id="1" posttypeid="1" body="x" />\n' * 4
                    + "</posts>\n")
    line = refused(capsys, ["prepare", "--posts", str(path), "--out", str(tmp_path / "out"), "--workers", "1"], path)
    assert "none of its 4 rows is a usable question or answer" in line
    assert not (tmp_path / "out" / "finetune").exists()


def test_prepare_reads_the_json_form_of_a_posts_dump(tmp_path, capsys):
    path = shared_file("se-apple-sample", "Posts.json")
    assert cli.main(["prepare", "--posts", path, "--out", str(tmp_path), "--workers", "1"]) == 0
    assert pq.read_table(tmp_path / "finetune" / "pairs.parquet").num_rows > 0
    assert "se-apple-sample" in capsys.readouterr().out


def test_a_pairs_file_with_a_wrongly_typed_text_column_is_refused(synthetic_pairs, tmp_path, capsys):
    bad = pairs_file(tmp_path / "numbers.parquet", rows=40, question=list(range(40)))
    refused(capsys, sft_args(synthetic_pairs, tmp_path / "run", "--data", str(bad), "--max-steps", "1"),
            bad, "column 'question' has type int64, expected string")


def test_an_empty_split_names_the_file(synthetic_pairs, tmp_path, capsys):
    (tmp_path / "finetune").mkdir()
    empty = pairs_file(tmp_path / "finetune" / "pairs.parquet", rows=0)
    refused(capsys, sft_args(synthetic_pairs, tmp_path / "run", "--data", str(tmp_path / "finetune"),
                             "--max-steps", "1"), f"{empty} has 0 rows")
    refused(capsys, rm_args(synthetic_pairs, tmp_path / "run", "--data", str(empty), "--max-steps", "1"),
            f"{empty} has 0 rows")


@pytest.mark.parametrize("argv, names", [
    (["rm", "--max-steps", "-1"], ["--max-steps must be >= 0, got -1"]),
    (["sft", "--seq-len", "1024"], ["--seq-len 1024 is longer than the model's max_seq_len 512"]),
    (["rm", "--max-length", "600"], ["--max-length 600 is longer than the model's max_seq_len 512"]),
    (["sft", "--save-every", "-2"], ["--save-every must be >= 0, got -2"]),
    (["sft", "--warmup-steps", "-1"], ["--warmup-steps must be >= 0, got -1"]),
])
def test_bad_flags_are_refused_before_anything_is_written(synthetic_pairs, tmp_path, capsys, argv, names):
    stage, *flags = argv
    args = (sft_args if stage == "sft" else rm_args)(synthetic_pairs, tmp_path / "run", "--max-steps", "1", *flags)
    refused(capsys, args, *names)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_empty_tokenizer_corpus_names_the_data(tmp_path, capsys):
    empty = tmp_path / "corpus.txt"
    empty.write_text("\n\n")
    refused(capsys, ["tokenizer", "--data", str(empty), "--out", str(tmp_path / "t.model")], empty)
    pairs = pairs_file(tmp_path / "pairs.parquet", rows=0)
    refused(capsys, ["tokenizer", "--data", str(pairs), "--out", str(tmp_path / "t.model")], f"{pairs} has 0 rows")


class NotATensor:
    """Anything but tensors and plain values: what a malicious or careless pickle holds."""


def test_pickled_objects_are_refused_naming_the_file(synthetic_pairs, tmp_path, capsys):
    from rlhf_engine.engine.model.config import ModelConfig
    _, tok = synthetic_pairs
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf("float32")))
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": NotATensor()}, hf / "pytorch_model.bin")
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512}))
    torch.save({"tok_embeddings.weight": torch.zeros(2), "extra": NotATensor()}, meta / "consolidated.00.pth")
    resume = tmp_path / "resume"
    resume.mkdir()
    torch.save({"step": 1, "extra": NotATensor()}, resume / "trainer_state.pt")
    for model, file, extra in ((str(hf), hf / "pytorch_model.bin", []), (str(meta), meta / "consolidated.00.pth", []),
                               ("tiny", resume / "trainer_state.pt", ["--resume", str(resume)])):
        args = sft_args(synthetic_pairs, tmp_path / "run", "--max-steps", "1", *extra)
        args[args.index("--model") + 1] = model
        line = refused(capsys, args, file, "holds objects that are not plain tensors")
        assert "will not be loaded" in line and "NotATensor" in line


def test_a_warm_up_longer_than_the_run_warns_once_with_the_numbers(synthetic_pairs, tmp_path, capsys):
    assert cli.main(sft_args(synthetic_pairs, tmp_path / "sft", "--max-steps", "2", "--warmup-steps", "5",
                             "--save-every", "0")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: sft: --warmup-steps 5 is longer than the run (--max-steps 2): the learning rate "
                        "peaks at 0.0012 instead of --lr 0.003"]
    assert cli.main(rm_args(synthetic_pairs, tmp_path / "rm", "--max-steps", "2", "--warmup-steps", "3",
                            "--save-every", "0")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: rm: --warmup-steps 3 is longer than the run (2 steps): the learning rate peaks "
                        "at 0.002 instead of --lr 0.003"]


# ---- 6. the kill-and-resume suite (slow) --------------------------------------------------------------

# Runs train.py after arming one fault: SIGKILL itself inside the Nth checkpoint save of this process
# (its files written into the hidden temp folder, before the rename), or inside its Nth rotation (after
# the rename to a hidden name, before the delete). FAULT=none runs it plainly.
ARMED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
import rlhf_engine.engine.training.train_state as ts
kind, nth = (os.environ["FAULT"].split(":") + ["0"])[:2]
calls = []

def count_then_maybe_die():
    calls.append(1)
    if len(calls) == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)

real_save, real_rmtree = ts.torch.save, ts.shutil.rmtree

def save(obj, f, *a, **k):  # the trainer state: the last file a checkpoint save writes
    real_save(obj, f, *a, **k)
    f.flush()
    count_then_maybe_die()

def rmtree(path, *a, **k):
    if ".trash-" in os.path.basename(path):
        count_then_maybe_die()
    real_rmtree(path, *a, **k)

if kind == "save":
    ts.torch.save = save
elif kind == "rotate":
    ts.shutil.rmtree = rmtree
sys.exit(train.main(sys.argv[1:]))
"""
MAX_STEPS = 24


def stage_args(stage, synthetic_pairs, ppo_base, out, reward_model=None):
    steps = ["--max-steps", str(MAX_STEPS), "--save-every", "3", "--keep", "2", "--resume", "auto"]
    if stage == "sft":
        return sft_args(synthetic_pairs, out, *steps, "--eval-every", "5")
    if stage == "rm":
        return rm_args(synthetic_pairs, out, *steps, "--eval-every", "5")
    base, rl = ppo_base
    return ["ppo", "--model", base, "--reward-model", reward_model, "--data", rl, "--out", str(out), "--batch-size", "4",
            "--mini-batch-size", "2", "--ppo-epochs", "1", "--response-min-length", "2", "--response-max-length",
            "2", "--lr", "5e-3", "--lora-targets", "all-linear", "--lora-dropout", "0", "--kl-coef", "0.05",
            "--no-adaptive-kl", "--sample-every", "0", "--device", "cpu", *steps]


def launch(args, fault="none", kill_after_s=None, wait=True):
    """Run train.py ARGS with FAULT armed (SIGKILL from outside after kill_after_s); its exit code (or, if
    not `wait`, the process)."""
    run = subprocess.Popen([sys.executable, "-c", ARMED.format(root=ROOT), *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                   "FAULT": fault})
    if not wait:
        return run
    try:
        _, err = run.communicate(timeout=kill_after_s or 600)
    except subprocess.TimeoutExpired:
        run.kill()
        _, err = run.communicate()
    assert run.returncode in (0, -signal.SIGKILL), err
    return run.returncode


def check_checkpoints(out, stage):
    """Every folder `--resume auto` could take is complete: its trainer state and model files load."""
    from safetensors.torch import load_file

    from rlhf_engine.engine.weights.load import load_checkpoint
    dist = init_dist("cpu")
    for _, path in list_checkpoints(str(out)):
        load_trainer_state(dist, path)
        if os.path.exists(os.path.join(path, "config.json")):
            load_checkpoint(path, head="score" if stage == "rm" else "lm")
        else:  # a LoRA policy: adapter files
            load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_run(stage, synthetic_pairs, ppo_base, random_rm,
                                                                       tmp_path):
    if stage == "ppo" and "lock_run_folder" not in open(os.path.join(ROOT, "engine", "ppo.py")).read():
        pytest.skip("engine/ppo.py does not lock its --out and cut its logs on resume yet (docs/RELIABILITY.md)")
    rng = random.Random(f"faults-{stage}")
    reference = tmp_path / stage / "reference"
    t0, run = time.time(), launch(stage_args(stage, synthetic_pairs, ppo_base, reference, random_rm), wait=False)
    while run.poll() is None and not (reference / "metrics.jsonl").exists():
        time.sleep(0.02)
    started = time.time() - t0  # imports, model and data: a kill before this finds nothing to resume
    assert run.wait(timeout=600) == 0, run.stderr.read()
    duration = time.time() - t0
    expected = rows(reference)

    # Campaigns, each in a fresh folder, each relaunched with --resume auto until the run finishes:
    # the first dies inside saves and a rotation, the others at random moments of their whole run.
    campaigns = [["save:2", "rotate:1", "save:3"]] + [[None] * 8 for _ in range(3)]
    launches, kills, trails = 0, [], []
    for c, faults in enumerate(campaigns):
        out = tmp_path / stage / f"faulty-{c}"
        kills.append(0)
        trails.append([])  # after each launch: the newest checkpoint's step (- for none), x if it was killed
        for fault in faults + ["none"]:
            kill_after_s = rng.uniform(0.8 * started, duration) if fault is None else None
            code = launch(stage_args(stage, synthetic_pairs, ppo_base, out, random_rm), fault or "none", kill_after_s)
            launches, kills[c] = launches + 1, kills[c] + (code != 0)
            hidden = [n for n in os.listdir(out) if n.startswith(".checkpoint")] if out.exists() else []
            if fault and fault != "none":  # the armed fault fired and left its hidden remains
                assert code == -signal.SIGKILL and any((".tmp-" if "save" in fault else ".trash-") in n
                                                       for n in hidden), (fault, hidden)
            check_checkpoints(out, stage)
            found = list_checkpoints(str(out))
            trails[c].append(f"{found[-1][0] if found else '-'}{'x' if code else ''}")
            if code == 0:  # train() returned: the run is complete
                break
        assert code == 0, f"campaign {c} did not finish"
        assert rows(out) == expected, f"campaign {c}"
        assert not [n for n in os.listdir(out) if n.startswith(".checkpoint")]
    print(f"\nfaults {stage}: {len(campaigns)} campaigns, {launches} launches, {sum(kills)} SIGKILLs {kills} "
          f"(campaign 0: inside two saves and a rotation; others: at random moments); reference run "
          f"{duration:.1f}s ({started:.1f}s to start); newest checkpoint after each launch (x: killed): "
          f"{' | '.join(map(' '.join, trails))}; "
          "every campaign's metrics.jsonl equals the uninterrupted run's; every checkpoint seen after a kill loads")
