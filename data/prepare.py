"""`train.py prepare`: StackExchange Posts.xml dumps -> preference pairs in four question-level splits.

Two passes, so memory stays bounded however large the dumps are:
1. stream each Posts.xml (data/stackexchange.py) and append every usable question and answer to one
   of K partition files on disk, chosen by question id, so a question and its answers always meet in
   the same partition (answers can come years of rows after their question);
2. read one partition at a time: group answers under their question, convert the bodies of questions
   with two or more answers to Markdown (in `workers` processes: it is most of the run time), score and
   pair the answers and pick each question's split (data/pairs.py), and stream the rows into one
   parquet file per split (data/pairs_io.py).
Everything is written inside a temporary folder in `--out` and renamed into place only when the run
has succeeded, so a failure never loses or half-writes an earlier result. The run is deterministic:
the same inputs, seed and partition size give the same files, with any number of workers.

Reference: StackLLaMA (Beeching et al. 2023, huggingface.co/blog/stackllama) and its dataset
lvwerra/stack-exchange-paired; llama2.c's tinystories.py for the shape of a data stage.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

from rlhf_engine.data.pairs import (DEFAULT_SPLITS, SPLITS, askell_score, assign_split, make_pairs, parse_splits,
                                    stable_seed)
from rlhf_engine.data.pairs_io import PairWriter
from rlhf_engine.data.stackexchange import Answer, ParseStats, Question, html_to_markdown, iter_posts, question_text

DEFAULT_LICENSE = "CC BY-SA 3.0"  # dumps before 2018 carry no per-post license; their content is CC BY-SA 3.0


@dataclass(frozen=True)
class PrepareConfig:
    out: str = field(metadata={"help": "output folder: OUT/{split}/pairs.parquet and OUT/summary.json"})
    posts: tuple[str, ...] = field(default=(), metadata={"help": "Posts.xml files (or their JSON conversions), one "
                                                                 "per site"})
    sites: tuple[str, ...] = field(default=(), metadata={
        "help": "site domain for each --posts file, for the metadata URLs; none given: each file's folder name"})
    splits: tuple[str, ...] = field(default=DEFAULT_SPLITS, metadata={
        "help": "question-level splits as NAME=FRACTION; names from finetune, reward, rl, evaluation, judge "
                "(questions for a held-out judge RM)"})
    max_pairs_per_question: int = field(default=10, metadata={"help": "sample at most this many pairs per question"})
    seed: int = field(default=0, metadata={"help": "seed for the pair sample and the split of each question"})
    jsonl: bool = field(default=False, metadata={"help": "also write OUT/{split}/pairs.jsonl"})
    partition_mb: float = field(default=1024.0, metadata={
        "help": "input megabytes per on-disk partition; pairing holds about one partition in memory"})
    workers: int = field(default=0, metadata={
        "help": "processes converting HTML to Markdown, most of the run time; 0 = one per CPU core"})
    progress_seconds: float = field(default=10.0, metadata={"help": "seconds between progress lines on stderr"})

    def __post_init__(self):
        if not self.posts:
            raise ValueError("prepare needs at least one Posts.xml file (--posts PATH [PATH ...])")
        if self.sites and len(self.sites) != len(self.posts):
            raise ValueError(f"--sites names {len(self.sites)} sites for {len(self.posts)} --posts files")
        if self.max_pairs_per_question < 1:
            raise ValueError(f"max_pairs_per_question must be at least 1, got {self.max_pairs_per_question}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per core) or more, got {self.workers}")
        if self.partition_mb <= 0:
            raise ValueError(f"partition_mb must be positive, got {self.partition_mb}")
        parse_splits(self.splits)

    def site_names(self) -> tuple[str, ...]:
        return self.sites or tuple(os.path.basename(os.path.dirname(os.path.abspath(p))) for p in self.posts)


@dataclass
class SiteSummary:
    site: str
    path: str
    parse: ParseStats = field(default_factory=ParseStats)  # pairing adds its own reasons to parse.skipped
    paired_questions: int = 0  # questions with >= 2 answers of different scores
    pairs: collections.Counter = field(default_factory=collections.Counter)  # split -> rows


@dataclass
class PrepareSummary:
    out: str
    splits: tuple[str, ...]
    sites: list[SiteSummary]
    files: list[str]
    seconds: float

    def table(self) -> str:
        """One line per site and a total, then the rows skipped, by file and reason."""
        head = ["site", "questions", "answers", "paired q", "pairs", *self.splits]
        rows = [[s.site, s.parse.questions, s.parse.answers, s.paired_questions, sum(s.pairs.values()),
                 *(s.pairs[n] for n in self.splits)] for s in self.sites]
        rows.append(["total", *map(sum, zip(*(r[1:] for r in rows)))])
        cells = [[c if isinstance(c, str) else f"{c:,}" for c in r] for r in [head, *rows]]
        width = [max(map(len, column)) for column in zip(*cells)]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, width))) for r in cells]
        rule = "-" * len(lines[0])
        lines = [lines[0], rule, *lines[1:-1], rule, lines[-1],
                 "paired q: questions with at least two answers of different scores"]
        skipped = sum(sum(s.parse.skipped.values()) for s in self.sites)
        lines.append(f"skipped: {skipped:,} rows" if skipped else "skipped: none")
        for s in self.sites:
            for reason, n in sorted(s.parse.skipped.items()):
                first = s.parse.first_skipped_row.get(reason)
                lines.append(f"  {s.path}: {n:,} {reason}" + (f" (first at row {first:,})" if first else ""))
            if s.parse.invalid_utf8:
                lines.append(f"  {s.path}: {s.parse.invalid_utf8:,} invalid UTF-8 sequences read as U+FFFD")
        other = sum(s.parse.other_post_types for s in self.sites)
        lines.append(f"not questions or answers (tag wikis etc.): {other:,} rows")
        lines.append(f"wrote {', '.join(self.files)} in {self.seconds:.1f}s")
        return "\n".join(lines)


def _progress(msg: str):
    print(f"prepare: {msg}", file=sys.stderr, flush=True)


def _spill(cfg: PrepareConfig, sites: list[SiteSummary], parts: list) -> None:
    """Pass 1: every usable record of every file into the partition of its question."""
    for site_index, site in enumerate(sites):
        started = time.monotonic()

        def report(stats: ParseStats, path=site.path, t0=started):
            mb = stats.bytes_read / 2 ** 20
            rate = mb / max(time.monotonic() - t0, 1e-9)
            _progress(f"{path}: {stats.rows:,} rows, {mb:,.0f} MB read ({rate:.1f} MB/s)")

        for record in iter_posts(site.path, site.parse, report, cfg.progress_seconds):
            question_id = record.id if isinstance(record, Question) else record.parent_id
            part = parts[(question_id * 1_000_003 + site_index) % len(parts)]
            kind = "Q" if isinstance(record, Question) else "A"
            part.write(json.dumps([site_index, kind, *record], ensure_ascii=False) + "\n")
        report(site.parse)


def _read_partition(path: str) -> tuple[dict, dict]:
    """{(site, question id): Question} and {(site, question id): [Answer, ...]} of one partition file."""
    questions: dict[tuple[int, int], Question] = {}
    answers: dict[tuple[int, int], list[Answer]] = collections.defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            site_index, kind, *fields = json.loads(line)
            if kind == "Q":
                q = Question(*fields[:4], tuple(fields[4]), *fields[5:])
                questions[site_index, q.id] = q
            else:
                a = Answer(*fields)
                answers[site_index, a.parent_id].append(a)
    return questions, answers


def _pair_partition(cfg: PrepareConfig, path: str, sites: list[SiteSummary], writers: dict, convert) -> None:
    """Pass 2 for one partition: group, convert to Markdown, score, pair, split and write.

    `convert` maps html_to_markdown over a list (a process pool's map when there are several workers):
    it is nine tenths of the run time, so every body that might be paired is converted in one call.
    """
    splits = parse_splits(cfg.splits)
    questions, answers = _read_partition(path)
    keys = sorted(questions.keys() | answers.keys())
    for key in keys:
        if key not in questions:
            sites[key[0]].parse.skipped["answer to a question not in the file"] += len(answers[key])
    candidates = [k for k in keys if k in questions and len(answers.get(k, ())) >= 2]
    markdown = iter(convert([a.body for k in candidates for a in answers[k]] + [questions[k].body for k in candidates]))
    answer_texts = [{a.id: next(markdown) for a in answers[k]} for k in candidates]
    question_bodies = [next(markdown) for _ in candidates]
    for key, texts, question_body in zip(candidates, answer_texts, question_bodies):
        site_index, question_id = key
        site, question, replies = sites[site_index], questions[key], answers[key]
        empty = sum(1 for a in replies if not texts[a.id])
        if empty:
            site.parse.skipped["answer whose Body is empty as Markdown"] += empty
        scored = [(a.id, askell_score(a.score, a.id == question.accepted_answer_id)) for a in replies if texts[a.id]]
        pairs = make_pairs(scored, cfg.max_pairs_per_question, stable_seed("pairs", cfg.seed, site.site, question_id))
        if not pairs:
            continue
        text = question_text(question.title, question_body)
        split = assign_split(splits, cfg.seed, site.site, text)  # by text: a repost under a new id stays put
        site.paired_questions += 1
        site.pairs[split] += len(pairs)
        common = dict(qid=question_id, question=text,
                      date=question.date[:10].replace("-", "/"),
                      metadata=[f"https://{site.site}/questions/{question_id}", f"https://{site.site}",
                                question.license or DEFAULT_LICENSE])
        for better, worse in pairs:
            writers[split].write(dict(common, response_j=texts[better], response_k=texts[worse]))


def prepare(cfg: PrepareConfig) -> PrepareSummary:
    """Run both passes and publish OUT/{split}/pairs.parquet (+ .jsonl) and OUT/summary.json."""
    started = time.monotonic()
    for path in cfg.posts:  # fail before any work on a typo in the last of several paths
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
    sites = [SiteSummary(site, path) for site, path in zip(cfg.site_names(), cfg.posts)]
    split_names = tuple(name for name, _ in parse_splits(cfg.splits))
    n_parts = max(1, math.ceil(sum(os.path.getsize(p) for p in cfg.posts) / (cfg.partition_mb * 2 ** 20)))
    n_workers = cfg.workers or os.cpu_count() or 1
    os.makedirs(cfg.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".prepare-", dir=cfg.out)
    # Started before any file is open, so the forked workers inherit nothing but the code they run.
    pool = multiprocessing.Pool(n_workers) if n_workers > 1 else None
    try:
        part_paths = [os.path.join(tmp, f"part-{i:05d}.jsonl") for i in range(n_parts)]
        parts = [open(p, "w", encoding="utf-8") for p in part_paths]
        try:
            _spill(cfg, sites, parts)
        finally:
            for part in parts:
                part.close()

        def convert(bodies: list[str]) -> list[str]:
            return pool.map(html_to_markdown, bodies, chunksize=64) if pool else list(map(html_to_markdown, bodies))

        writers = {name: PairWriter(os.path.join(tmp, f"{name}.parquet"),
                                    os.path.join(tmp, f"{name}.jsonl") if cfg.jsonl else None)
                   for name in split_names}
        last_report = time.monotonic()
        for i, path in enumerate(part_paths):
            _pair_partition(cfg, path, sites, writers, convert)
            os.remove(path)
            if time.monotonic() - last_report >= cfg.progress_seconds:
                _progress(f"paired partition {i + 1}/{n_parts}: {sum(w.rows for w in writers.values()):,} pairs")
                last_report = time.monotonic()
        for writer in writers.values():
            writer.close()
        if not any(site.pairs for site in sites):  # four empty splits would only fail later, further from the cause
            raise ValueError(f"{', '.join(cfg.posts)}: no question has two usable answers of different scores, so "
                             "there is no pair to write")
        summary = PrepareSummary(cfg.out, split_names, sites, [], time.monotonic() - started)
        _publish(cfg, tmp, summary)
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _publish(cfg: PrepareConfig, tmp: str, summary: PrepareSummary) -> None:
    """Rename the finished files into place (each rename is atomic) and drop what this run did not make."""
    summary_json = {"config": dataclasses.asdict(cfg),
                    "sites": [dict(site=s.site, path=s.path, questions=s.parse.questions, answers=s.parse.answers,
                                   rows=s.parse.rows, paired_questions=s.paired_questions, pairs=dict(s.pairs),
                                   skipped=dict(s.parse.skipped), invalid_utf8=s.parse.invalid_utf8,
                                   other_post_types=s.parse.other_post_types) for s in summary.sites]}
    with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary_json, f, indent=1)
    moves = [(os.path.join(tmp, "summary.json"), os.path.join(cfg.out, "summary.json"))]
    stale = []
    for name in SPLITS:
        for ext in ("parquet", "jsonl"):
            target = os.path.join(cfg.out, name, f"pairs.{ext}")
            made = os.path.join(tmp, f"{name}.{ext}")
            (moves.append((made, target)) if os.path.exists(made) else stale.append(target))
    for made, target in moves:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(made, target)
        summary.files.append(target)
    for target in stale:  # an older run's split or format, which would now disagree with summary.json
        if os.path.exists(target):
            os.remove(target)


def run(cfg: PrepareConfig) -> int:
    """`train.py prepare`: write the splits, then print the summary table."""
    print(prepare(cfg).table())
    return 0
