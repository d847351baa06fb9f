"""Synthetic StackExchange posts for the demo and the tests, written in the dump's own Posts.xml format.

The project cannot ship StackExchange content, yet `train.py demo` must run on a fresh machine, so this
generator writes a small site whose rows go through the real pipeline (parse, HTML -> Markdown, score,
pair, split). The vocabulary is a few hundred words, so a 500-1000 piece tokenizer covers it.

Each answer's votes follow `answer_points`, a property of the text that a tiny model learns quickly:
    +2  on topic: it names the object the question asks about (the question's keyword)
    +1  it gives steps ("First, ... Then ...")
    +1  it ends politely ("Hope this helps!")
    -2  it is dismissive ("Just search for it next time.")
plus noise on a fifth of the answers, so a reward model can beat chance without reaching 100%, and PPO
has something to improve (stay on topic, give steps, be polite). Bodies carry <p>, <ol>, <code> and <a>
and entities, so the Markdown conversion is exercised.
"""
from __future__ import annotations

import os
import random
import re
from xml.sax.saxutils import escape

TOPICS = {
    "coffee": ("grinder", "beans", "espresso", "kettle", "filter"),
    "bicycle": ("chain", "brake", "tire", "saddle", "gear"),
    "garden": ("tomato", "soil", "compost", "seeds", "hose"),
    "bread": ("dough", "yeast", "oven", "flour", "crust"),
    "guitar": ("string", "tuner", "fret", "pick", "amp"),
    "camera": ("lens", "battery", "shutter", "tripod", "flash"),
}
KEYWORDS = {kw: topic for topic, kws in TOPICS.items() for kw in kws}
TITLES = ("How do I fix the {kw}?", "What is the best way to clean a {kw}?", "Why does my {kw} stop working?",
          "How often should I replace the {kw}?", "Is it safe to leave the {kw} outside?")
PROBLEMS = ("makes a strange noise", "feels loose", "looks dirty", "does not work well", "broke last week")
ACTIONS = ("clean", "check", "replace", "adjust", "dry", "tighten")
WHEN = ("every week", "once a month", "after each use", "before winter", "twice a year")
POLITE = "Hope this helps!"
RUDE = "Just search for it next time."
LICENSE = "CC0 1.0 (synthetic text)"  # the dump's per-row ContentLicense attribute, which the pairs' metadata cite
VOTES = {-2: -2, -1: -1, 0: 0, 1: 1, 2: 3, 3: 6, 4: 12}  # points -> net votes; Askell scores -1 -1 0 1 2 3 4


def question_keyword(question: str) -> str | None:
    """The object a synthetic question asks about: its first word that is a known keyword."""
    return next((w for w in re.findall(r"[a-z]+", question.lower()) if w in KEYWORDS), None)


FEATURES = {"on topic": 2, "steps": 1, "polite": 1, "dismissive": -2}  # the hidden rule's points per feature


def answer_features(question: str, answer: str) -> dict[str, bool]:
    """Which of the hidden rule's features an answer (HTML or Markdown) to a synthetic question has."""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    return {"on topic": question_keyword(question) in words, "steps": "First," in answer and "Then" in answer,
            "polite": POLITE in answer, "dismissive": RUDE in answer}


def rule_points(features: dict[str, bool]) -> int:
    """The hidden rule's points for an answer with these features."""
    return sum(FEATURES[name] for name, has in features.items() if has)


def answer_points(question: str, answer: str) -> int:
    """The hidden quality of an answer to a synthetic question; see the module doc."""
    return rule_points(answer_features(question, answer))


def _question(rng: random.Random, keyword: str) -> tuple[str, str]:
    title = rng.choice(TITLES).format(kw=keyword)
    body = f"<p>I use my {keyword} {rng.choice(WHEN)}. Lately the {keyword} {rng.choice(PROBLEMS)}.</p>\n"
    if rng.random() < 0.5:
        body += f"<p>I tried <code>{rng.choice(ACTIONS)} --{keyword}</code> but it did not help &amp; I am stuck.</p>\n"
    return title, body


def _answer(rng: random.Random, keyword: str) -> str:
    on_topic = rng.random() < 0.6
    subject = keyword if on_topic else rng.choice([k for k in KEYWORDS if KEYWORDS[k] != KEYWORDS[keyword]])
    body = f"<p>You should {rng.choice(ACTIONS)} the {subject} {rng.choice(WHEN)}.</p>\n"
    if rng.random() < 0.5:
        first, then = rng.sample(ACTIONS, 2)
        body += f"<ol>\n<li>First, {first} it gently.</li>\n<li>Then {then} it &amp; test again.</li>\n</ol>\n"
    if rng.random() < 0.3:
        body += f'<p>See <a href="https://example.com/{subject}">this guide</a> for details.</p>\n'
    ending = rng.random()
    if ending < 0.45:
        body += f"<p>{POLITE}</p>\n"
    elif ending < 0.65:
        body += f"<p>{RUDE}</p>\n"
    return body


def synthetic_posts(n_questions: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows of a synthetic Posts.xml as attribute dicts (what the dump's <row> elements hold), by Id."""
    rng = random.Random(seed)
    rows, next_id = [], 1
    for topic in TOPICS:  # one tag wiki per topic: rows that are neither questions nor answers
        rows.append(dict(Id=str(next_id), PostTypeId="5", CreationDate="2020-01-01T00:00:00.000", Score="0",
                         Body=f"<p>Questions about {topic}.</p>\n"))
        next_id += 1
    for i in range(n_questions):
        keyword = rng.choice(list(KEYWORDS))
        title, body = _question(rng, keyword)
        date = f"2020-{1 + i // 2800 % 12:02d}-{1 + i // 100 % 28:02d}T{i % 24:02d}:{i % 60:02d}:00.000"
        question = dict(Id=str(next_id), PostTypeId="1", CreationDate=date, Score=str(rng.randint(0, 9)),
                        Body=body, Title=title, Tags=f"<{KEYWORDS[keyword]}><{keyword}>", ContentLicense=LICENSE)
        rows.append(question)
        next_id += 1
        answers = []
        for _ in range(rng.randint(1, 4)):
            text = _answer(rng, keyword)
            points = answer_points(title, text)
            votes = VOTES[points] + (rng.randint(-3, 3) if rng.random() < 0.2 else 0)
            answers.append(dict(Id=str(next_id), PostTypeId="2", ParentId=question["Id"], CreationDate=date,
                                Score=str(votes), Body=text, ContentLicense=LICENSE))
            next_id += 1
        best = max(answers, key=lambda a: int(a["Score"]))
        if rng.random() < 0.6:
            question["AcceptedAnswerId"] = best["Id"]
        question["AnswerCount"] = str(len(answers))
        rows.extend(answers)
    return rows


def posts_xml(rows: list[dict[str, str]]) -> str:
    """Rows in the dump's format: attributes XML-escaped, newlines as &#xA; like the real files."""
    entities = {'"': "&quot;", "\n": "&#xA;", "\r": "&#xD;", "\t": "&#x9;"}
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    lines += ["  <row " + " ".join(f'{k}="{escape(v, entities)}"' for k, v in row.items()) + " />" for row in rows]
    lines.append("</posts>\n")
    return "\n".join(lines)


def write_synthetic_posts(path: str | os.PathLike, n_questions: int, seed: int = 0) -> str:
    """Write a synthetic Posts.xml with `n_questions` questions (and their answers) to `path`."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(posts_xml(synthetic_posts(n_questions, seed)))
    os.replace(tmp, path)
    return path
