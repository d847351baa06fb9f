"""`train.py eval`: did PPO make the model better? Every arm (a checkpoint, or an adapter on its base)
answers the same held-out questions; reward models score every answer; the statistics say by how much
one arm beats another, with intervals (engine/eval/stats.py), and the report shows it
(engine/eval/report.py).

The reward model PPO optimised is the *proxy*; a reward model trained on other questions (prepare's
`judge` split) is a *held-out judge*. The proxy's verdict is the number RLHF is known to fool (Gao et
al. 2022, arXiv 2210.10760), so the judge's comes first and the gap between them is reported. The
data's two human answers of each question are extra arms, scored by the same judges: they anchor what
a good score is. Every sample is drawn with a seed made of (seed, question index, sample index), so a
model's answers do not depend on the batch or the world size, and a rerun reproduces them. Under
torchrun, rank r answers questions r, r + W, ...; rank 0 gathers and writes.

Lengths are in tokens; KL(π_arm ‖ π_baseline) is exact over the vocabulary, summed over the arm's
response tokens (0 for the baseline itself; not defined for human answers).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from rlhf_engine.data.tokenizer import encode_answers, format_prompt
from rlhf_engine.engine.weights.adapters import is_adapter_folder, read_adapter_base
from rlhf_engine.engine.weights.builder import load_model, resolve_tokenizer
from rlhf_engine.engine.weights.hf_folder import CONFIG
from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.training.dist import Dist, all_gather_objects
from rlhf_engine.engine.training.train_state import row_seed
from rlhf_engine.engine.model.generate import SamplingConfig
from rlhf_engine.engine.eval.questions import Question, load_questions
from rlhf_engine.engine.eval.report import ATTACKS, CODE_PADDING, GENERIC_ANSWER, write_outputs
from rlhf_engine.engine.rl.reward import load_reward_model
from rlhf_engine.engine.model.precision import DTYPES
from rlhf_engine.engine.eval.answers import sample_answers, score_responses, sequence_kl


@dataclass(frozen=True)
class EvalConfig:
    models: tuple[str, ...] = field(default=None, metadata={
        "help": "arms to compare, each NAME=PATH or PATH: a checkpoint folder, or an adapter folder (its base is "
                "the one its adapter_config.json names)"})
    judges: tuple[str, ...] = field(default=None, metadata={
        "help": "held-out reward models, each NAME=PATH or PATH (a merged RM folder or an RM adapter folder)"})
    data: str = field(default=None, metadata={"help": "pairs whose questions are asked (the evaluation split)"})
    out: str = field(default=None, metadata={"help": "output folder: report.md, results.json, samples.jsonl, "
                                                     "frontier.png, tb/"})
    proxy: str | None = field(default=None, metadata={
        "help": "the reward model PPO optimised (NAME=PATH or PATH): scored beside the judges, with the "
                "proxy-minus-judge gap"})
    baseline: str | None = field(default=None, metadata={"help": "the arm the others are compared with "
                                                                 "(default: the first of --models)"})
    num_prompts: int | None = field(default=None, metadata={"help": "questions asked (default: all)"})
    samples_per_prompt: int = field(default=1, metadata={"help": "answers sampled per question and model"})
    batch_size: int = field(default=16, metadata={"help": "rows per generation and scoring batch"})
    kl: bool = field(default=True, metadata={"help": "exact KL(arm ‖ baseline) per response (one tokenizer)"})
    human: bool = field(default=True, metadata={"help": "score the data's two human answers as arms"})
    best_of: int = field(default=0, metadata={
        "help": "add a best-of-N arm: N samples of the baseline per question, the --proxy's favourite kept "
                "(KL to the baseline log N - (N-1)/N); 0 = none"})
    attacks: bool = field(default=False, metadata={
        "help": "add three cheap hacks as arms (a fixed generic answer, the question echoed back, the baseline's "
                "answer padded with code blocks) and say whether each judge sees through them"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples (over questions) per interval"})
    examples: int = field(default=5, metadata={"help": "questions shown side by side in report.md"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.model or tokenizer.json (default: "
                                                                  "beside the first model, or its GGUF's own)"})
    dtype: str = field(default="fp32", metadata={"help": "compute dtype", "choices": sorted(DTYPES)})
    load_in_8bit: bool = field(default=False, metadata={"help": "store every network in 8 bits"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    sampling: SamplingConfig = field(default=SamplingConfig(), metadata={"prefix": ""})

    def __post_init__(self):
        for name in ("models", "judges", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        for name in ("num_prompts", "samples_per_prompt", "batch_size", "bootstrap"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        names = [named(m)[0] for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"--models names must differ, got {names}")
        if self.best_of == 1 or self.best_of < 0 or (self.best_of and not self.proxy):
            raise ValueError(f"--best-of must be 0 or at least 2, and needs --proxy (the RM that picks), got "
                             f"{self.best_of}" + ("" if self.proxy else " without --proxy"))
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"--baseline {self.baseline} is not one of the --models names {names}")


def named(spec: str) -> tuple[str, str]:
    """NAME=PATH -> (NAME, PATH); a bare PATH is named after its last two path components."""
    name, sep, path = spec.partition("=")
    if sep and name and os.sep not in name:
        return name, path
    parts = os.path.normpath(spec).split(os.sep)
    return "/".join(parts[-2:]), spec


class Response(NamedTuple):
    question: int
    arm: str
    sample: int
    tokens: list[int]  # the response alone (ends with EOS when the model ended it)
    kl: float  # exact KL(arm ‖ baseline) summed over the response; nan for human answers


def sample_arm(model, arm: str, questions: list[Question], prompts: dict[int, list[int]], k: int,
               sampling: SamplingConfig, batch_size: int, tok, log, first: int = 0) -> list[list[int]]:
    """k responses per question, row (question i, sample j) seeded by (seed, i, j) for j from `first`:
    independent of the batch."""
    rows, started = [(q.index, j) for q in questions for j in range(first, first + k)], time.time()

    def progress(done):
        elapsed = time.time() - started
        log(f"eval: {arm}: {done}/{len(rows)} answers, {done / elapsed:.1f}/s, "
            f"eta {elapsed / done * (len(rows) - done):.0f}s")
    return sample_answers(model, [prompts[i] for i, _ in rows], [row_seed(sampling.seed, i, j) for i, j in rows],
                          sampling, tok.eos_id, tok.pad_id, batch_size, progress)


def human_responses(questions: list[Question], tok, room: dict[int, int]) -> dict[str, list[list[int]]]:
    """The two human answers of each question as token responses, EOS-terminated like a model's (cut to
    the room the model's context leaves after the prompt), tokenized as they follow the query in a full text."""
    texts, arms = [q.text for q in questions], {}
    for arm, side in (("human (better)", [q.better for q in questions]),
                      ("human (other)", [q.worse for q in questions])):
        arms[arm] = [(answer + [tok.eos_id])[:room[q.index]]
                     for q, answer in zip(questions, encode_answers(tok, texts, side))]
    return arms


def attack_responses(questions: dict[int, Question], baseline_answers: dict[tuple[int, int], list[int]], tok,
                     room: dict[int, int]) -> dict[str, dict[tuple[int, int], list[int]]]:
    """The --attacks arms, {arm: {(question, sample): tokens}}, EOS-terminated and cut to the context's room:
    answers a judge must rank below the baseline's if it rewards answering (a constant answer scored 86.5%
    length-controlled on AlpacaEval 2, Zheng et al. 2024; StackLLaMA's policy learnt to pad with ```)."""
    padding = tok.encode(CODE_PADDING)
    texts = {i: q.text for i, q in questions.items()}
    generic = dict(zip(texts, encode_answers(tok, list(texts.values()), [GENERIC_ANSWER] * len(texts))))
    echo = dict(zip(texts, encode_answers(tok, list(texts.values()), list(texts.values()))))
    out = {arm: {} for arm in ATTACKS}
    for (i, j), answer in baseline_answers.items():
        text = [t for t in answer if t != tok.eos_id]
        for arm, tokens in zip(ATTACKS, (generic[i], echo[i], text + padding)):
            out[arm][(i, j)] = (tokens + [tok.eos_id])[:room[i]]
    return out


def evaluate(cfg: EvalConfig, dist: Dist) -> dict:
    log = print if dist.is_main else (lambda *a, **k: None)
    arms = [named(m) for m in cfg.models]
    baseline = cfg.baseline or arms[0][0]
    arms.sort(key=lambda arm: arm[0] != baseline)  # the baseline first: its model scores the others' KL
    judges = [named(j) for j in cfg.judges] + ([("proxy:" + named(cfg.proxy)[0], named(cfg.proxy)[1])]
                                               if cfg.proxy else [])
    tok = resolve_tokenizer(read_adapter_base(arms[0][1]) if is_adapter_folder(arms[0][1]) else arms[0][1],
                            cfg.tokenizer)
    first = read_adapter_base(arms[0][1]) if is_adapter_folder(arms[0][1]) else arms[0][1]
    context = ModelConfig.from_hf(os.path.join(first, CONFIG)).max_seq_len if os.path.isdir(first) else None
    questions = load_questions(cfg.data, cfg.num_prompts, tok,
                               context - cfg.sampling.max_new_tokens if context else None)
    mine = questions[dist.rank::dist.world_size]
    prompts = {q.index: tok.encode(format_prompt(q.text), bos=True) for q in mine}
    k = cfg.samples_per_prompt
    log(f"eval: {len(questions)} questions x {k} samples, {len(arms)} models, {len(judges)} reward models, "
        f"world {dist.world_size}, device {dist.device}, dtype {cfg.dtype}, {torch.get_num_threads()} threads "
        "per rank (OMP_NUM_THREADS)")

    responses: list[Response] = []
    baseline_model, max_seq_len = None, None
    seconds = {"sampling": 0.0, "kl": 0.0, "scoring": 0.0}  # this rank's wall time per phase
    for arm, path in arms:
        model = load_model(path, tok, dtype=cfg.dtype, device=dist.device, load_in_8bit=cfg.load_in_8bit)
        max_seq_len = max_seq_len or model.cfg.max_seq_len
        room = model.cfg.max_seq_len - max([len(p) for p in prompts.values()] or [0])
        sampling = dataclasses.replace(cfg.sampling, max_new_tokens=min(cfg.sampling.max_new_tokens, max(room, 1)))
        t0 = time.time()
        answers = sample_arm(model, arm, mine, prompts, k, sampling, cfg.batch_size, tok, log)
        if cfg.best_of and arm == baseline:  # candidates: samples k, k + 1, ... so none is the baseline's own
            candidates = sample_arm(model, f"{arm} x{cfg.best_of}", mine, prompts, k * cfg.best_of, sampling,
                                    cfg.batch_size, tok, log, first=k)
        seconds["sampling"] += time.time() - t0
        t0 = time.time()
        rows = [(q.index, j) for q in mine for j in range(k)]
        if cfg.kl and baseline_model is not None and model.cfg.vocab_size != baseline_model.cfg.vocab_size:
            raise ValueError(f"{arm} and {baseline} have different vocabularies ({model.cfg.vocab_size} vs "
                             f"{baseline_model.cfg.vocab_size}): the KL needs one; pass --no-kl")
        kls = [0.0] * len(rows)
        if cfg.kl and baseline_model is not None:
            kls = []
            for start in range(0, len(rows), cfg.batch_size):
                batch = slice(start, start + cfg.batch_size)
                kls += sequence_kl(model, baseline_model, [prompts[i] for i, _ in rows[batch]], answers[batch],
                                   tok.pad_id, cfg.dtype)
        responses += [Response(i, arm, j, a, kl if cfg.kl else float("nan"))
                      for (i, j), a, kl in zip(rows, answers, kls)]
        seconds["kl"] += time.time() - t0
        if baseline_model is None and cfg.kl:
            baseline_model = model
        else:
            del model
    room = {q.index: max_seq_len - len(prompts[q.index]) for q in mine}
    if cfg.human:
        for arm, answers in human_responses(mine, tok, room).items():
            responses += [Response(q.index, arm, 0, a, float("nan")) for q, a in zip(mine, answers)]
    if cfg.attacks:
        baseline_answers = {(r.question, r.sample): r.tokens for r in responses if r.arm == baseline}
        by_index = {q.index: q for q in mine}
        for arm, answers in attack_responses(by_index, baseline_answers, tok, room).items():
            responses += [Response(i, arm, j, a, float("nan")) for (i, j), a in answers.items()]
    del baseline_model

    reward_fns = {}

    def reward_model(path):
        if path not in reward_fns:
            reward_fns[path] = load_reward_model(path, tok, cfg.dtype, dist.device, cfg.load_in_8bit)
        return reward_fns[path]
    best_of_arm = []
    if cfg.best_of:
        t0, n = time.time(), cfg.best_of
        picks = score_responses(reward_model(named(cfg.proxy)[1]),
                                [prompts[q.index] for q in mine for _ in range(k * n)], candidates, tok.pad_id,
                                dist.device, cfg.dtype, cfg.batch_size)
        seconds["scoring"] += time.time() - t0
        best_of_arm = [f"best-of-{n} ({named(cfg.proxy)[0]})"]
        kl = math.log(n) - (n - 1) / n  # the best of n draws, against the distribution they were drawn from
        for row, q in enumerate(q for q in mine for _ in range(k)):
            group = range(row * n, (row + 1) * n)
            chosen = max(group, key=lambda c: picks[c])
            responses.append(Response(q.index, best_of_arm[0], row % k, candidates[chosen], kl))
    scores: dict[str, list[float]] = {}
    for judge, path in judges:
        reward_fn = reward_model(path)
        t0 = time.time()
        scores[judge] = score_responses(reward_fn, [prompts[r.question] for r in responses],
                                        [r.tokens for r in responses], tok.pad_id, dist.device, cfg.dtype,
                                        cfg.batch_size)
        seconds["scoring"] += time.time() - t0
        log(f"eval: scored {len(responses)} answers with {judge} in {time.time() - t0:.1f}s")
    records = [dict(question=r.question, arm=r.arm, sample=r.sample, length=len(r.tokens), kl=r.kl,
                    response=tok.decode([t for t in r.tokens if t != tok.eos_id]),
                    scores={judge: s[n] for judge, s in scores.items()}) for n, r in enumerate(responses)]
    gathered = [rec for part in all_gather_objects(dist, records) for rec in part]
    if not dist.is_main:
        return {}
    gathered.sort(key=lambda rec: (rec["question"], rec["arm"], rec["sample"]))
    log("eval: " + ", ".join(f"{phase} {s:.1f}s" for phase, s in seconds.items()))
    results = write_outputs(cfg, questions, gathered, [a for a, _ in arms] + best_of_arm, baseline,
                            [j for j, _ in judges])
    return {**results, "seconds": seconds}
