"""One small logger: TensorBoard scalars and text on rank 0, and one readable stdout line per log step.

Scalars are namespaced (`train/loss`, `ppo/clipfrac`, `perf/tokens_per_s`, ...). Other ranks get a
logger that does nothing, so training code calls it unconditionally. A resumed run first drops what
the steps it will redo had logged (metrics.jsonl rewritten atomically, TensorBoard's purge_step), so
its logs read as one clean run. MFU and the step report against measured peaks are engine/training/roofline.py's.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import torch

def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Logger:
    """resume_step: the step this run starts at. Rows and TensorBoard events at or after it (left by the
    run that is being resumed, or by an earlier run in the same folder when it is 0) are dropped, so the
    logs read as one clean run. None appends to whatever is there."""

    def __init__(self, out_dir: str | None, enabled: bool, config: dict | None = None,
                 resume_step: int | None = None):
        self.enabled = enabled and out_dir is not None
        self.writer = None
        self.jsonl = None
        self.start = time.time()
        self.last_line, self.first_line = 0.0, None  # when the last stdout line went out; (step, time) of the first
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # only the writing rank pays for the import
            # purge_step: TensorBoard hides the events of steps >= it that earlier event files hold.
            self.writer = SummaryWriter(log_dir=f"{out_dir}/tb", purge_step=resume_step)
            # The same scalars as JSON lines: easy to read back in scripts and tests.
            if resume_step is not None:
                drop_rows_from(f"{out_dir}/metrics.jsonl", resume_step)
            self.jsonl = open(f"{out_dir}/metrics.jsonl", "a")
            if config is not None:
                text = "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```"
                self.writer.add_text("config", text, 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        row = {"step": step}
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:  # a distribution: histogram only
                self.writer.add_histogram(name, value.float(), step)
                continue
            value = float(value)
            row[name] = value
            if math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def text(self, step: int, name: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(name, text, step)

    def line(self, step: int, max_steps: int | None, parts: dict[str, float | str], due: bool = True,
             every_s: float = 30.0) -> None:
        """One stdout line: `step 12/100 | loss 2.3456 | lr 1.0e-05 | ... | elapsed 1m02s | eta 8m30s`, when
        `due` (the stage's --log-every) or when `every_s` seconds have passed without one, so a slow machine
        is never silent for minutes. The ETA is the pace since the first line, which leaves out start-up
        (loading, the first step's allocations) that would otherwise inflate it many times."""
        now = time.time()
        if not self.enabled or not (due or now - self.last_line >= every_s):
            return
        self.last_line = now
        if self.first_line is None:
            self.first_line = (step, now)
        elapsed = now - self.start
        fields = [f"step {step}" + (f"/{max_steps}" if max_steps else "")]
        for k, v in parts.items():
            fields.append(f"{k} {_fmt(v)}")
        fields.append(f"elapsed {_duration(elapsed)}")
        first_step, first_time = self.first_line
        if max_steps and step > first_step:
            fields.append(f"eta {_duration((now - first_time) / (step - first_step) * (max_steps - step))}")
        print(" | ".join(fields), flush=True)

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        if self.enabled:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.jsonl.close()


def drop_rows_from(path: str, step: int) -> None:
    """Keep only the rows of a metrics.jsonl logged before `step`; the file is replaced atomically, so a
    kill meanwhile leaves the old file or the new one. A torn last line (a kill mid-write) is dropped."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = []
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", step) < step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp"  # the run holds its folder's lock: no one else writes here
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.4f}"


def _duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"
