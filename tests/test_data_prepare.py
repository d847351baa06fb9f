"""The `prepare` stage end to end on synthetic dumps: counts, splits, files, bad input, failures."""
import collections
import math
import os

import pyarrow.parquet as pq
import pytest

from rlhf_engine.data.pairs_io import PAIR_COLUMNS, read_pairs
from rlhf_engine.data.prepare import PrepareConfig, prepare
from rlhf_engine.data.stackexchange import PostsFormatError, html_to_markdown
from rlhf_engine.data.synthetic import posts_xml, synthetic_posts, write_synthetic_posts

SPLIT_NAMES = ("finetune", "reward", "rl", "evaluation")


def independent_count(rows, max_pairs=10):
    """Counts by the rule as SOURCE.md states it, with floats and nothing from data/pairs.py."""
    questions = {r["Id"]: r for r in rows if r["PostTypeId"] == "1"}
    answers = collections.defaultdict(list)
    for r in rows:
        if r["PostTypeId"] == "2":
            answers[r["ParentId"]].append(r)

    def score(a):
        votes = int(a["Score"])
        accepted = questions[a["ParentId"]].get("AcceptedAnswerId") == a["Id"]
        return -1 if votes < 0 else round(math.log2(1 + votes)) + accepted

    paired = pairs = 0
    for qid in questions:
        s = [score(a) for a in answers[qid]]
        n = sum(1 for i in range(len(s)) for j in range(i) if s[i] != s[j])
        paired += n > 0
        pairs += min(n, max_pairs)
    return len(questions), sum(map(len, answers.values())), paired, pairs, score


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dump") / "cooking.example.com"
    return write_synthetic_posts(folder / "Posts.xml", n_questions=300, seed=3)


def run_prepare(posts, out, **kw):
    return prepare(PrepareConfig(out=str(out), posts=tuple(map(str, posts)), progress_seconds=1e9, **kw))


def test_counts_match_an_independent_count(site, tmp_path):
    summary = run_prepare([site], tmp_path / "out")
    questions, answers, paired, pairs, _ = independent_count(synthetic_posts(300, seed=3))
    s = summary.sites[0]
    assert (s.parse.questions, s.parse.answers, s.paired_questions, sum(s.pairs.values())) == \
           (questions, answers, paired, pairs)
    assert s.site == "cooking.example.com" and not s.parse.skipped and s.parse.other_post_types == 6
    for name in SPLIT_NAMES:
        assert pq.read_table(tmp_path / "out" / name / "pairs.parquet").num_rows == s.pairs[name] > 0
    table = summary.table()
    assert f"{pairs:,}" in table and "cooking.example.com" in table and "skipped: none" in table


def test_splits_are_disjoint_by_question_and_pairs_are_ordered(site, tmp_path):
    run_prepare([site], tmp_path / "out")
    rows = synthetic_posts(300, seed=3)
    *_, score = independent_count(rows)
    answer_score = {(int(a["ParentId"]), html_to_markdown(a["Body"])): score(a) for a in rows if a["PostTypeId"] == "2"}
    qids = {}
    for name in SPLIT_NAMES:
        table = read_pairs(tmp_path / "out" / name)
        assert table.column_names == list(PAIR_COLUMNS)
        qids[name] = set(table["qid"].to_pylist())
        for r in table.to_pylist():
            assert answer_score[r["qid"], r["response_j"]] > answer_score[r["qid"], r["response_k"]]
            assert r["question"].startswith(next(q["Title"] for q in rows if q["Id"] == str(r["qid"])) + "\n\n")
        per_question = collections.Counter(table["qid"].to_pylist())
        assert max(per_question.values()) <= 10
    for a in SPLIT_NAMES:
        for b in SPLIT_NAMES:
            assert a == b or not qids[a] & qids[b]


def test_several_sites_metadata_and_dates(tmp_path):
    a = write_synthetic_posts(tmp_path / "a" / "Posts.xml", 40, seed=1)
    b = write_synthetic_posts(tmp_path / "b" / "Posts.xml", 40, seed=2)
    summary = run_prepare([a, b], tmp_path / "out", sites=("alpha.stackexchange.com", "beta.example.org"))
    assert [s.site for s in summary.sites] == ["alpha.stackexchange.com", "beta.example.org"]
    table = read_pairs(tmp_path / "out")
    assert table.num_rows == sum(sum(s.pairs.values()) for s in summary.sites)
    sites = collections.Counter()
    for r in table.to_pylist():
        url, home, license = r["metadata"]
        assert url == f"{home}/questions/{r['qid']}" and license == "CC0 1.0 (synthetic text)"
        assert len(r["date"]) == 10 and r["date"][4] == r["date"][7] == "/"
        sites[home] += 1
    assert sites == {"https://alpha.stackexchange.com": sum(summary.sites[0].pairs.values()),
                     "https://beta.example.org": sum(summary.sites[1].pairs.values())}


def test_output_is_reproducible_and_independent_of_partitions_and_workers(site, tmp_path):
    run_prepare([site], tmp_path / "one", workers=2)
    run_prepare([site], tmp_path / "again", workers=1)
    run_prepare([site], tmp_path / "many", partition_mb=0.01, workers=1)  # about 30 partitions, no pool
    run_prepare([site], tmp_path / "seed", seed=1)
    for name in SPLIT_NAMES:
        one = pq.read_table(tmp_path / "one" / name / "pairs.parquet")
        assert one.equals(pq.read_table(tmp_path / "again" / name / "pairs.parquet"))
        many = pq.read_table(tmp_path / "many" / name / "pairs.parquet").to_pylist()
        key = lambda r: (r["qid"], r["response_j"], r["response_k"])  # noqa: E731
        assert sorted(one.to_pylist(), key=key) == sorted(many, key=key)
    assert read_pairs(tmp_path / "seed" / "rl").to_pylist() != read_pairs(tmp_path / "one" / "rl").to_pylist()


def test_bad_rows_are_counted_in_the_summary(tmp_path):
    rows = [dict(Id="1", PostTypeId="1", CreationDate="2020-01-01T00:00:00", Title="Q", Body="<p>q</p>"),
            dict(Id="2", PostTypeId="2", ParentId="1", Score="5", Body="<p>good</p>"),
            dict(Id="3", PostTypeId="2", ParentId="1", Score="0", Body="<p>meh \x00</p>"),
            dict(Id="4", PostTypeId="2", ParentId="1", Score="1", Body="<p></p>"),      # empty once converted
            dict(Id="5", PostTypeId="2", ParentId="99", Score="1", Body="<p>orphan</p>"),
            dict(Id="6", PostTypeId="2", ParentId="98", Score="1", Body="<p>orphan</p>"),
            dict(Id="2", PostTypeId="2", ParentId="1", Score="9", Body="<p>duplicate</p>"),
            dict(Id="7", PostTypeId="2", ParentId="1", Score="2", Body=" ")]
    xml = posts_xml(rows).replace("\x00", "").encode().replace(b"meh ", b"meh \xff")
    path = tmp_path / "site" / "Posts.xml"
    path.parent.mkdir()
    path.write_bytes(xml)
    summary = run_prepare([path], tmp_path / "out")
    s = summary.sites[0]
    assert dict(s.parse.skipped) == {"answer to a question not in the file": 2, "duplicate Id": 1,
                                     "answer with an empty Body": 1, "answer whose Body is empty as Markdown": 1}
    assert s.parse.invalid_utf8 == 1
    assert (s.parse.questions, s.parse.answers, s.paired_questions, sum(s.pairs.values())) == (1, 5, 1, 1)
    out = read_pairs(tmp_path / "out").to_pylist()
    assert [(r["response_j"], r["response_k"]) for r in out] == [("good", "meh \ufffd")]
    table = summary.table()
    assert "2 answer to a question not in the file (first at row" not in table  # found when pairing, no row
    assert "2 answer to a question not in the file" in table and "1 duplicate Id (first at row 7)" in table
    assert "1 invalid UTF-8 sequences" in table and "skipped: 5 rows" in table


def test_a_failed_run_keeps_the_previous_output(site, tmp_path):
    out = tmp_path / "out"
    run_prepare([site], out, jsonl=True)
    before = {p: open(p, "rb").read() for p in sorted(map(str, out.rglob("*"))) if os.path.isfile(p)}
    truncated = tmp_path / "t" / "Posts.xml"
    truncated.parent.mkdir()
    truncated.write_text(open(site).read()[:50_000])
    with pytest.raises(PostsFormatError, match="truncated"):
        run_prepare([site, truncated], out)
    after = {p: open(p, "rb").read() for p in sorted(map(str, out.rglob("*"))) if os.path.isfile(p)}
    assert after == before
    assert not [p for p in os.listdir(out) if p.startswith(".prepare-")]


def test_outputs_of_an_older_run_do_not_linger(site, tmp_path):
    out = tmp_path / "out"
    run_prepare([site], out, jsonl=True)
    assert (out / "reward" / "pairs.jsonl").exists()
    assert read_pairs(out / "reward").equals(read_pairs(out / "reward" / "pairs.jsonl"))
    run_prepare([site], out, splits=("finetune=0.5", "rl=0.5"))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.*")) == \
           ["finetune/pairs.parquet", "rl/pairs.parquet", "summary.json"]


def cli(argv):
    """`train.py prepare ARGV` in this process."""
    import train
    return train.main(["prepare", *argv])


def test_cli_prints_the_table(site, tmp_path, capsys):
    assert cli(["--posts", site, "--out", str(tmp_path / "out"), "--max-pairs-per-question", "2",
                "--splits", "finetune=0.5", "evaluation=0.5"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "evaluation" in stdout.splitlines()[0] and "reward" not in stdout.splitlines()[0]
    assert stderr.startswith("prepare: ")  # the closing progress line of each file
    table = read_pairs(tmp_path / "out")
    assert max(collections.Counter(table["qid"].to_pylist()).values()) == 2


@pytest.mark.parametrize("name, content, message", [
    ("missing.xml", None, "missing.xml: no such file"),
    ("e.xml", "", "e.xml is empty"),
    ("u.xml", "<users><row/></users>", "root element is <users>"),
])
def test_cli_bad_files_exit_2_with_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert cli(["--posts", str(path), "--out", str(tmp_path / "out")]) == 2
    stdout, stderr = capsys.readouterr()
    lines = [line for line in stderr.splitlines() if not line.startswith("prepare: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize("kw, message", [
    (dict(posts=()), "at least one Posts.xml"),
    (dict(posts=("a",), sites=("x", "y")), "2 sites for 1"),
    (dict(posts=("a",), max_pairs_per_question=0), "at least 1"),
    (dict(posts=("a",), splits=("rl=0.9",)), "sum to 1"),
])
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        PrepareConfig(out="o", **kw)
