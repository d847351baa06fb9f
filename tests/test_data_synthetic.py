"""The synthetic demo site (data/synthetic.py): valid dump format, seeded, and a learnable preference."""
import re

import numpy as np
import pytest

from rlhf_engine.data.pairs_io import read_pairs
from rlhf_engine.data.prepare import PrepareConfig, prepare
from rlhf_engine.data.stackexchange import Answer, ParseStats, Question, iter_posts
from rlhf_engine.data.synthetic import POLITE, RUDE, VOTES, answer_points, synthetic_posts, write_synthetic_posts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    posts = write_synthetic_posts(root / "demo.example.com" / "Posts.xml", n_questions=600, seed=11)
    prepare(PrepareConfig(out=str(root / "pairs"), posts=(posts,), progress_seconds=1e9))
    return root / "pairs", posts


def test_seeded():
    assert synthetic_posts(30, seed=1) == synthetic_posts(30, seed=1) != synthetic_posts(30, seed=2)


def test_written_file_parses_as_a_dump(prepared):
    _, posts = prepared
    stats = ParseStats()
    records = list(iter_posts(posts, stats))
    rows = synthetic_posts(600, seed=11)
    assert stats.questions == 600 == sum(isinstance(r, Question) for r in records)
    assert stats.answers == sum(r["PostTypeId"] == "2" for r in rows) == sum(isinstance(r, Answer) for r in records)
    assert not stats.skipped and stats.other_post_types == 6
    bodies = " ".join(r.body for r in records)
    assert all(tag in bodies for tag in ("<p>", "<code>", "<a href=", "<ol>", "&amp;"))


def test_points_by_hand():
    q = "How do I fix the chain?"
    assert answer_points(q, "You should oil the chain.") == 2
    assert answer_points(q, f"<p>You should oil the brake.</p><p>{POLITE}</p>") == 1
    assert answer_points(q, f"<ol><li>First, dry it.</li><li>Then oil it.</li></ol><p>{RUDE}</p>") == -1
    assert answer_points(q, f"You should clean the chain.\n\n1. First, dry it.\n2. Then oil it.\n\n{POLITE}") == 4


def test_votes_follow_points_up_to_noise():
    rows = synthetic_posts(400, seed=5)
    titles = {r["Id"]: r["Title"] for r in rows if r["PostTypeId"] == "1"}
    answers = [r for r in rows if r["PostTypeId"] == "2"]
    exact = sum(int(a["Score"]) == VOTES[answer_points(titles[a["ParentId"]], a["Body"])] for a in answers)
    assert 0.75 < exact / len(answers) < 0.95  # about a fifth get noise (some of it zero)


def test_chosen_beats_rejected_on_hidden_quality(prepared):
    pairs, _ = prepared
    table = read_pairs(pairs).to_pylist()
    better = np.mean([answer_points(r["question"], r["response_j"]) > answer_points(r["question"], r["response_k"])
                      for r in table])
    assert 0.8 < better < 1.0  # a clear signal, with noise left for the reward model to be wrong about


def test_a_bag_of_words_reward_model_beats_chance(prepared):
    # The stand-in for "a small reward model can learn it": logistic regression on word counts of
    # (chosen - rejected), trained on the reward split and scored on the evaluation split.
    pairs, _ = prepared
    train, test = read_pairs(pairs / "reward").to_pylist(), read_pairs(pairs / "evaluation").to_pylist()
    vocab = {w: i for i, w in enumerate(sorted({w for r in train for t in (r["response_j"], r["response_k"])
                                                for w in re.findall(r"[a-z!]+", t.lower())}))}

    def features(rows):
        x = np.zeros((len(rows), len(vocab)))
        for i, r in enumerate(rows):
            for sign, text in ((1, r["response_j"]), (-1, r["response_k"])):
                for w in re.findall(r"[a-z!]+", text.lower()):
                    if w in vocab:
                        x[i, vocab[w]] += sign
        return x

    x_train, x_test = features(train), features(test)
    w = np.zeros(len(vocab))
    for _ in range(300):  # gradient descent on -log sigmoid(w . (f(j) - f(k)))
        margin = x_train @ w
        w += 0.5 * x_train.T @ (1 / (1 + np.exp(margin))) / len(train)
    accuracy = np.mean(x_test @ w > 0)
    assert accuracy > 0.7
    assert len(vocab) < 250  # a small vocabulary: a 500-1000 piece tokenizer covers it
