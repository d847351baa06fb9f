"""Stream a StackExchange `Posts.xml` dump into question and answer records, and HTML bodies into Markdown.

The archive.org dump holds one `<row .../>` per post inside `<posts>`; PostTypeId 1 is a question and
2 an answer (other types are tag wikis, moderator nominations and so on). `Score` is the net vote count
(up minus down). Bodies are HTML; `html_to_markdown` turns them into the Markdown people type.
The same table converted to JSON (`{"posts": {"row": [{"Id": "1", ...}, ...]}}`, or just the list of
rows, with the attribute names of the XML; numbers may be JSON numbers) is read too, whole: such
conversions are samples, not multi-gigabyte dumps.

Memory does not grow with the file (real dumps are tens of GB): the XML is fed to expat in 1 MiB
pieces and each row is dropped once read; duplicate ids are found with a bitmap (one bit per id).
A row that is well-formed XML but unusable is skipped with a reason that `ParseStats` counts. XML that
is not well-formed (a truncated or foreign file) cannot be resynchronised, so it stops the run with a
`PostsFormatError` naming the file, line and column; so does a file none of whose rows is a usable
question or answer (another table, or renamed attributes), which would otherwise give empty splits.

References: the Stack Exchange data dump schema (meta.stackexchange.com/q/2677); Askell et al. 2021,
"A General Language Assistant as a Laboratory for Alignment" (preference-model pretraining data);
HuggingFaceH4/stack-exchange-preferences; markdownify (github.com/matthewwithanm/python-markdownify).
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import os
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from typing import Callable, Iterator, NamedTuple

from markdownify import markdownify

READ_BYTES = 1 << 20
MAX_POST_ID = (1 << 31) - 1  # bounds the duplicate-id bitmap at 256 MiB; real ids are < 10^8


class PostsFormatError(ValueError):
    """The file is not a readable Posts.xml: empty, truncated, not XML, or not the posts table."""


class Question(NamedTuple):
    id: int
    title: str
    body: str  # HTML, as in the dump
    date: str  # CreationDate, ISO 8601
    tags: tuple[str, ...]
    accepted_answer_id: int | None
    license: str  # ContentLicense; "" in dumps older than 2018, which do not carry it per row


class Answer(NamedTuple):
    id: int
    parent_id: int
    score: int  # net votes
    body: str  # HTML


@dataclasses.dataclass
class ParseStats:
    """What one pass over a Posts.xml saw. `skipped` counts unusable rows by reason."""
    rows: int = 0
    questions: int = 0
    answers: int = 0
    other_post_types: int = 0  # tag wikis etc.: valid rows that are neither questions nor answers
    invalid_utf8: int = 0  # byte sequences that were not UTF-8, read as U+FFFD
    bytes_read: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_skipped_row: dict = dataclasses.field(default_factory=dict)  # reason -> 1-based row number

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped_row.setdefault(reason, self.rows)


# ---- HTML -> Markdown ---------------------------------------------------------------------------

def _code_language(el) -> str:
    # StackExchange marks highlighted blocks as <pre class="lang-py prettyprint-override">.
    for cls in el.get("class") or ():
        if cls.startswith("lang-") and cls != "lang-none":
            return cls[len("lang-"):]
    return ""


# Underscores and asterisks are left unescaped: the text is training data for a language model, and
# "file\_name" is not what anyone types. Headings use "#", bullets "-", code blocks are fenced.
MARKDOWN_OPTIONS = dict(heading_style="atx", bullets="-", escape_underscores=False, escape_asterisks=False,
                        code_language_callback=_code_language)


class _TextOnly(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str):
        self.parts.append(data)


def html_to_markdown(html: str) -> str:
    """A post body in Markdown: fenced code, `inline code`, [links](url), lists, > quotes; entities decoded."""
    try:
        return markdownify(html, **MARKDOWN_OPTIONS).strip()
    except RecursionError:
        # markdownify recurses per tag; a few hundred nested tags would end a long run over one post.
        # Such a post keeps its text and loses its markup.
        parser = _TextOnly()
        parser.feed(html)
        parser.close()
        return "".join(parser.parts).strip()


def question_text(title: str, body_markdown: str) -> str:
    """The `question` column: the title as the first paragraph, then the body."""
    return "\n\n".join(part for part in (title.strip(), body_markdown) if part)


# ---- reading the dump ---------------------------------------------------------------------------

def _decoded_pieces(f, stats: ParseStats) -> Iterator[str]:
    """UTF-8 text of a binary file, piece by piece; each invalid byte sequence becomes one U+FFFD.

    The strict decoder is retried past each bad sequence (rather than errors="replace") so that the
    bad sequences can be counted exactly; a sequence cut by a piece boundary waits for the next piece.
    """
    tail = b""
    first = True
    while True:
        data = f.read(READ_BYTES)
        final = not data
        stats.bytes_read += len(data)
        data = tail + data
        view = memoryview(data)
        pieces, pos = [], 0
        while True:
            try:
                text, used = codecs.utf_8_decode(view[pos:], "strict", final)
                pieces.append(text)
                pos += used
                break
            except UnicodeDecodeError as e:
                pieces.append(codecs.utf_8_decode(view[pos:pos + e.start], "strict", True)[0] + "\ufffd")
                stats.invalid_utf8 += 1
                pos += e.end
        tail = bytes(view[pos:])
        text = "".join(pieces)
        if first and text.startswith("\ufeff"):  # byte-order mark; expat rejects it inside a str
            text = text[1:]
        first = first and not text
        if text:
            yield text
        if final:
            return


def _int(attrs: dict, name: str) -> int | None:
    value = attrs.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _SeenIds:
    """A bitmap of post ids, grown on demand: one bit per id instead of a set's ~60 bytes per id."""

    def __init__(self):
        self.bits = bytearray(1 << 16)

    def add(self, post_id: int) -> bool:
        """Mark `post_id`; False if it was already marked."""
        byte, bit = divmod(post_id, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(max(byte + 1, 2 * len(self.bits)) - len(self.bits)))
        if self.bits[byte] >> bit & 1:
            return False
        self.bits[byte] |= 1 << bit
        return True


def _record(attrs: dict, seen: _SeenIds, stats: ParseStats) -> Question | Answer | None:
    """The record a row describes, or None (counted in `stats`) if it is not a usable question/answer."""
    post_id, post_type = _int(attrs, "Id"), attrs.get("PostTypeId")
    if post_id is None or not 0 < post_id <= MAX_POST_ID:
        return stats.skip("row without a valid Id")
    if not seen.add(post_id):
        return stats.skip("duplicate Id")
    if post_type not in ("1", "2"):
        if post_type is None or not post_type.isdigit():
            return stats.skip("row without a valid PostTypeId")
        stats.other_post_types += 1
        return None
    kind = "question" if post_type == "1" else "answer"
    body = attrs.get("Body")
    if body is None or not body.strip():
        return stats.skip(f"{kind} with an empty Body")
    if kind == "answer":
        parent, score = _int(attrs, "ParentId"), _int(attrs, "Score")
        if parent is None:
            return stats.skip("answer without a valid ParentId")
        if score is None:
            return stats.skip("answer without an integer Score")
        stats.answers += 1
        return Answer(post_id, parent, score, body)
    date = attrs.get("CreationDate", "")
    if len(date) < 10 or not (date[:4] + date[5:7] + date[8:10]).isdigit():
        return stats.skip("question without a valid CreationDate")
    accepted = _int(attrs, "AcceptedAnswerId")
    if accepted is None and attrs.get("AcceptedAnswerId") is not None:
        return stats.skip("question with a non-integer AcceptedAnswerId")
    tags = tuple(t for t in attrs.get("Tags", "").replace(">", "<").replace("|", "<").split("<") if t)
    stats.questions += 1
    return Question(post_id, attrs.get("Title", ""), body, date, tags, accepted, attrs.get("ContentLicense", ""))


def iter_posts(path: str | os.PathLike, stats: ParseStats | None = None,
               progress: Callable[[ParseStats], None] | None = None,
               progress_seconds: float = 10.0) -> Iterator[Question | Answer]:
    """Questions and answers of one Posts.xml (or Posts.json), in file order; unusable rows are counted
    in `stats`.

    Raises FileNotFoundError for a missing file and PostsFormatError for one that is empty, not XML,
    truncated, whose root element is not <posts>, or that holds no usable question or answer.
    `progress(stats)` is called every `progress_seconds` while reading.
    """
    path = os.fspath(path)
    stats = stats if stats is not None else ParseStats()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise PostsFormatError(f"{path} is empty; expected a StackExchange Posts.xml")
    rows, usable = stats.rows, stats.questions + stats.answers
    read = _json_posts if _is_json(path) else _xml_posts
    yield from read(path, stats, progress, progress_seconds)
    if stats.questions + stats.answers == usable:
        rows = stats.rows - rows
        if not rows:
            raise PostsFormatError(f"{path} holds no rows; expected a StackExchange posts table")
        reasons = collections.Counter(stats.skipped)
        if stats.other_post_types:
            reasons["neither questions nor answers (PostTypeId not 1 or 2)"] = stats.other_post_types
        reason, n = reasons.most_common(1)[0]
        raise PostsFormatError(f"{path}: none of its {rows:,} rows is a usable question or answer ({n:,} {reason}); "
                               "is it a StackExchange Posts table?")


def _is_json(path: str) -> bool:
    """Whether the file's first character (after any byte-order mark and space) opens JSON, not XML."""
    with open(path, "rb") as f:
        head = f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1] in (b"{", b"[")


def _json_posts(path: str, stats: ParseStats, progress, progress_seconds: float) -> Iterator[Question | Answer]:
    with open(path, "rb") as f:
        text = "".join(_decoded_pieces(f, stats))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PostsFormatError(f"{path} is not a readable Posts.json: {e.msg} at line {e.lineno}, "
                               f"column {e.colno}") from None
    rows = data
    if isinstance(rows, dict):
        rows = rows.get("posts", rows)
        rows = rows.get("row", rows) if isinstance(rows, dict) else rows
    if not isinstance(rows, list):
        raise PostsFormatError(f"{path} is JSON but not a posts table: expected {{\"posts\": {{\"row\": [...]}}}} "
                               "or a list of rows")
    seen, last_report = _SeenIds(), time.monotonic()
    for row in rows:
        stats.rows += 1
        if not isinstance(row, dict):
            stats.skip("row that is not a JSON object")
            continue
        # The XML's attribute values are text; JSON conversions turn some into numbers.
        attrs = {k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items() if v is not None}
        record = _record(attrs, seen, stats)
        if record is not None:
            yield record
        if progress is not None and time.monotonic() - last_report >= progress_seconds:
            progress(stats)
            last_report = time.monotonic()


def _xml_posts(path: str, stats: ParseStats, progress, progress_seconds: float) -> Iterator[Question | Answer]:
    parser = ET.XMLPullParser(events=("start", "end"))
    seen = _SeenIds()
    root, depth, last_report = None, 0, time.monotonic()
    with open(path, "rb") as f:
        pieces = _decoded_pieces(f, stats)
        while True:
            piece = next(pieces, None)
            try:
                if piece is None:
                    parser.close()
                else:
                    parser.feed(piece)
                events = list(parser.read_events())
            except ET.ParseError as e:
                line, column = e.position
                ending = " (the file ends early: truncated?)" if piece is None else ""
                what = str(e).rsplit(": line", 1)[0]  # expat's message without its own position
                raise PostsFormatError(f"{path} is not a readable Posts.xml: XML {what} at line {line}, "
                                       f"column {column}{ending}") from None
            for event, el in events:
                if event == "start":
                    depth += 1
                    if root is None:
                        root = el
                        if el.tag != "posts":
                            raise PostsFormatError(f"{path} is not a Posts.xml: its root element is <{el.tag}>, "
                                                   f"expected <posts>")
                    continue
                depth -= 1
                if depth != 1:  # only direct children of <posts> are posts
                    continue
                stats.rows += 1
                record = _record(el.attrib, seen, stats) if el.tag == "row" else stats.skip(
                    f"element <{el.tag}> where a <row> was expected")
                root.remove(el)  # constant memory: the tree never holds more than the current row
                if record is not None:
                    yield record
            if progress is not None and time.monotonic() - last_report >= progress_seconds:
                progress(stats)
                last_report = time.monotonic()
            if piece is None:
                break
    if root is None:
        raise PostsFormatError(f"{path} holds no XML element; expected a StackExchange Posts.xml")
