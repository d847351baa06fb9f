"""Posts.xml parsing: records, HTML -> Markdown, and every kind of bad input the dumps can hold."""
import pytest

from rlhf_engine.data.stackexchange import (Answer, ParseStats, PostsFormatError, Question, html_to_markdown,
                                            iter_posts, question_text)
from rlhf_engine.data.synthetic import posts_xml

HEAD = '<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'
Q = ('  <row Id="{id}" PostTypeId="1" CreationDate="2014-01-21T20:26:05.383" Score="3" Title="T{id}" '
     'Body="&lt;p&gt;q&lt;/p&gt;" />\n')
A = ('  <row Id="{id}" PostTypeId="2" ParentId="{parent}" CreationDate="2014-01-22T00:00:00.000" Score="{score}" '
     'Body="&lt;p&gt;a{id}&lt;/p&gt;" />\n')


def write(tmp_path, content, name="Posts.xml"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def parse(path):
    stats = ParseStats()
    return list(iter_posts(path, stats)), stats


# ---- records ------------------------------------------------------------------------------------

def test_questions_and_answers_with_their_fields(tmp_path):
    rows = [dict(Id="1", PostTypeId="1", AcceptedAnswerId="3", CreationDate="2014-01-21T20:26:05.383", Score="18",
                 Body="<p>Body &amp; more</p>\n", Title="What is a hop?", Tags="<hops><beer-style>",
                 ContentLicense="CC BY-SA 4.0"),
            dict(Id="2", PostTypeId="5", Body="<p>tag wiki</p>"),
            dict(Id="3", PostTypeId="2", ParentId="1", CreationDate="2014-01-21T20:31:18.540", Score="-4",
                 Body="<p>An answer</p>")]
    records, stats = parse(write(tmp_path, "\ufeff" + posts_xml(rows)))  # real dumps start with a BOM
    assert records == [Question(1, "What is a hop?", "<p>Body &amp; more</p>\n", "2014-01-21T20:26:05.383",
                                ("hops", "beer-style"), 3, "CC BY-SA 4.0"),
                       Answer(3, 1, -4, "<p>An answer</p>")]
    assert (stats.rows, stats.questions, stats.answers, stats.other_post_types) == (3, 1, 1, 1)
    assert not stats.skipped
    assert question_text(records[0].title, html_to_markdown(records[0].body)) == "What is a hop?\n\nBody & more"


def test_rows_stream_in_small_reads(tmp_path, monkeypatch):
    # 1-byte reads cut every multi-byte character and every tag in half; the records must not change.
    content = HEAD + Q.format(id=1).replace("T1", "caf\u00e9 \u2014 \U0001f37a") + "</posts>\n"
    expected, _ = parse(write(tmp_path, content))
    monkeypatch.setattr("rlhf_engine.data.stackexchange.READ_BYTES", 1)
    got, stats = parse(write(tmp_path, content))
    assert got == expected and got[0].title == "caf\u00e9 \u2014 \U0001f37a"
    assert stats.invalid_utf8 == 0


# ---- HTML -> Markdown ---------------------------------------------------------------------------

@pytest.mark.parametrize("html, markdown", [
    ("<p>Use <code>a_b*c</code> here.</p>", "Use `a_b*c` here."),
    ("<pre><code>for i in x:\n    print(i &lt; 2)\n</code></pre>", "```\nfor i in x:\n    print(i < 2)\n```"),
    ('<pre class="lang-py prettyprint-override"><code>x = 1\n</code></pre>', "```py\nx = 1\n```"),
    ('<p>See <a href="http://x.org/?a=1&amp;b=2">the docs</a>.</p>', "See [the docs](http://x.org/?a=1&b=2)."),
    ("<ul><li>one</li><li>two</li></ul>", "- one\n- two"),
    ("<ol><li>first</li><li>second</li></ol>", "1. first\n2. second"),
    ("<blockquote><p>quoted</p></blockquote>", "> quoted"),
    ("<p>caf&eacute; &amp; &quot;tea&quot; &#8212; it&#39;s</p>", 'café & "tea" — it\'s'),
    ("<h2>Title</h2><p>snake_case stays</p>", "## Title\n\nsnake_case stays"),
    ("<p>one</p>\n\n<p>two</p>", "one\n\ntwo"),
])
def test_html_to_markdown(html, markdown):
    assert html_to_markdown(html) == markdown


def test_deeply_nested_html_keeps_its_text():
    # markdownify recurses once per tag; 5000 nested quotes would exceed Python's recursion limit.
    assert html_to_markdown("<blockquote>" * 5000 + "deep &amp; down" + "</blockquote>" * 5000) == "deep & down"


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    (HEAD + Q.format(id=1) + '  <row Id="2" PostTypeId="2" Bo', "line 4, column 2 (the file ends early: truncated?)"),
    (HEAD + Q.format(id=1), "line 4, column 0 (the file ends early: truncated?)"),
    ('<?xml version="1.0"?>\n<users><row Id="1" /></users>', "root element is <users>, expected <posts>"),
    ('{"posts": {"row": []}}', "holds no rows"),
    ('{"posts": {"row": [}}', "not a readable Posts.json: Expecting value at line 1, column 20"),
    ('{"users": 3}', "is JSON but not a posts table"),
    (HEAD + "</posts>", "holds no rows"),
    (HEAD + '<row id="1" posttypeid="1" body="x" />' * 3 + "</posts>",
     "none of its 3 rows is a usable question or answer (3 row without a valid Id)"),
    ("plain text", "not a readable Posts.xml: XML syntax error at line 1, column 0"),
    ("\x00\x01binary", "not a readable Posts.xml"),
    (HEAD + '<row Id="1" Body="a\x01b" />', "not a readable Posts.xml: XML not well-formed (invalid token) at line 3"),
])
def test_unreadable_files_name_the_file_and_position(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(PostsFormatError, match="Posts.xml") as e:
        parse(path)
    assert str(e.value).startswith(path) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_json_conversion_reads_like_the_xml(tmp_path):
    import dataclasses
    import json
    rows = [dict(Id="1", PostTypeId="1", AcceptedAnswerId="3", CreationDate="2014-01-21T20:26:05.383", Score="18",
                 Body="<p>q</p>", Title="What is a hop?", Tags="<hops>"),
            dict(Id="2", PostTypeId="5", Body="<p>tag wiki</p>"),
            dict(Id="3", PostTypeId="2", ParentId="1", Score="-4", Body="<p>An answer</p>")]
    xml, xml_stats = parse(write(tmp_path, posts_xml(rows)))
    as_numbers = [{k: int(v) if k == "Score" else v for k, v in r.items()} for r in rows]  # as converters write
    for i, data in enumerate(({"posts": {"row": as_numbers}}, as_numbers)):
        records, stats = parse(write(tmp_path, json.dumps(data, indent=2), name=f"Posts{i}.json"))
        assert records == xml and dataclasses.replace(stats, bytes_read=0) == dataclasses.replace(xml_stats,
                                                                                                   bytes_read=0)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.xml"):
        parse(str(tmp_path / "nope.xml"))


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    content = (HEAD + Q.format(id=1) + A.format(id=2, parent=1, score=1)
               + '  <row PostTypeId="1" Body="x" />\n'                               # no Id
               + '  <row Id="x7" PostTypeId="1" Body="x" />\n'                       # Id not an integer
               + '  <row Id="8" Body="x" />\n'                                       # no PostTypeId
               + '  <row Id="9" PostTypeId="2" Score="1" Body="x" />\n'              # answer without ParentId
               + '  <row Id="10" PostTypeId="2" ParentId="1" Score="many" Body="x" />\n'
               + '  <row Id="11" PostTypeId="1" Title="t" Body="x" />\n'             # question without a date
               + '  <row Id="12" PostTypeId="1" CreationDate="2014-01-01T00:00:00" AcceptedAnswerId="?" Body="x" />\n'
               + '  <row Id="13" PostTypeId="2" ParentId="1" Score="2" Body="  " />\n'  # empty body
               + '  <row Id="14" PostTypeId="1" CreationDate="2014-01-01T00:00:00" Title="t" />\n'  # no body
               + A.format(id=2, parent=1, score=5)                                   # duplicate Id
               + '  <comment Id="15" />\n'
               + "</posts>\n")
    records, stats = parse(write(tmp_path, content))
    assert [r.id for r in records] == [1, 2]
    assert stats.rows == 13
    assert dict(stats.skipped) == {
        "row without a valid Id": 2, "row without a valid PostTypeId": 1, "answer without a valid ParentId": 1,
        "answer without an integer Score": 1, "question without a valid CreationDate": 1,
        "question with a non-integer AcceptedAnswerId": 1, "answer with an empty Body": 1,
        "question with an empty Body": 1, "duplicate Id": 1, "element <comment> where a <row> was expected": 1}
    assert stats.first_skipped_row["row without a valid Id"] == 3
    assert stats.first_skipped_row["duplicate Id"] == 12


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    body = "caf\u00e9".encode() + b" \xff\xfe and \xe2\x82 end \xc3"  # 3 bad sequences, the last cut off
    content = (HEAD + Q.format(id=1)).encode() + b'  <row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="' \
        + body + b'" />\n</posts>\n'
    records, stats = parse(write(tmp_path, content))
    assert records[1].body == "caf\u00e9 \ufffd\ufffd and \ufffd end \ufffd"
    assert stats.invalid_utf8 == 4  # \xff and \xfe are one sequence each


def test_duplicate_ids_across_types_and_large_ids(tmp_path):
    content = HEAD + Q.format(id=5) + Q.format(id=5).replace('PostTypeId="1"', 'PostTypeId="2" ParentId="5"') \
        + Q.format(id=2 ** 30) + Q.format(id=2 ** 31) + "</posts>\n"
    records, stats = parse(write(tmp_path, content))
    assert [r.id for r in records] == [5, 2 ** 30]
    assert dict(stats.skipped) == {"duplicate Id": 1, "row without a valid Id": 1}


def test_memory_is_bounded_by_one_read(tmp_path, monkeypatch):
    # Rows leave the tree once read, so it never holds more than one read's worth (here 300 bytes,
    # about 2 rows), however long the file.
    monkeypatch.setattr("rlhf_engine.data.stackexchange.READ_BYTES", 300)
    path = write(tmp_path, HEAD + "".join(A.format(id=i, parent=1, score=0) for i in range(2, 5000)) + "</posts>\n")
    gen = iter_posts(path)
    most = 0
    for _ in range(4000):
        next(gen)
        most = max(most, len(gen.gi_yieldfrom.gi_frame.f_locals["root"]))  # iter_posts -> _xml_posts
    assert most <= 3
