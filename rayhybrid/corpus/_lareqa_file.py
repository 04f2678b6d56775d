"""Parsing one LAReQA language file (SQuAD JSON with ``sentences`` / ``sentence_breaks``).

The quirks counted here are listed in :mod:`rayhybrid.corpus.lareqa`.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

from rayhybrid.corpus._io import read_json, require
from rayhybrid.datamodel import DataError, LoadReport

__all__ = ["LangFile", "Paragraph", "Question", "parse_file"]


@dataclass
class Paragraph:
    """One paragraph: its context and sentence spans (realigned where they drifted)."""

    article: int
    index: int
    context: str
    sentences: list[str]
    breaks: list[tuple[int, int]]


@dataclass
class Question:
    """One question and the index of the sentence holding its answer start."""

    qid: str
    text: str
    article: int
    paragraph: int
    sentence: int


@dataclass
class LangFile:
    """One parsed ``<lang>.json``: titles, paragraphs, questions by id, its own quirk report."""

    lang: str
    path: Path
    report: LoadReport
    titles: list[str] = field(default_factory=list)
    paragraphs: list[list[Paragraph]] = field(default_factory=list)  # [article][paragraph]
    questions: dict[str, Question] = field(default_factory=dict)


def _check_paragraph(para: Paragraph, where: str, report: LoadReport) -> None:
    """Count the quirks of one paragraph's sentence spans."""
    ctx, spans = para.context, para.breaks
    for i, ((b, e), sent) in enumerate(zip(spans, para.sentences)):
        if ctx[b:e] != sent:
            report.note(
                "sentence_offsets_drift",
                f"{where} sentence {i}: context[{b}:{e}] ends "
                f"{ctx[b:e][-25:]!r}, sentence ends {sent[-25:]!r}",
            )
    for i in range(len(spans) - 1):
        if spans[i][1] > spans[i + 1][0]:
            report.note("overlapping_sentence_breaks", f"{where} spans {spans[i]} {spans[i + 1]}")
        elif ctx[spans[i][1] : spans[i + 1][0]].strip():
            report.note(
                "text_between_sentences",
                f"{where} after sentence {i}: {ctx[spans[i][1] : spans[i + 1][0]]!r}",
            )
    if spans and ctx[: spans[0][0]].strip():
        report.note("text_before_first_break", f"{where}: {ctx[: spans[0][0]][:40]!r}")
    if spans and ctx[spans[-1][1] :].strip():
        report.note("text_after_last_break", f"{where}: {ctx[spans[-1][1] :][:40]!r}")
    seen: set[str] = set()
    for i, sent in enumerate(para.sentences):
        if sent in seen:
            report.note("duplicate_sentence_in_paragraph", f"{where} sentence {i}: {sent[:40]!r}")
        seen.add(sent)


def _realign(para: Paragraph, where: str, report: LoadReport, window: int = 64) -> None:
    """Move drifted spans onto their sentence text when it is found near the given offset.

    Answer starts are offsets into ``context``, so the place of the sentence *in the
    context* decides which sentence holds an answer. A span is moved only when its exact
    sentence text occurs within ``window`` characters and the spans stay in order.
    """
    ctx, spans = para.context, para.breaks
    for i, ((b, e), sent) in enumerate(zip(list(spans), para.sentences)):
        if ctx[b:e] == sent or not sent:
            continue
        pos = ctx.find(sent, max(0, b - window), min(len(ctx), e + window))
        lo = spans[i - 1][1] if i else 0
        hi = spans[i + 1][0] if i + 1 < len(spans) else len(ctx)
        if pos >= 0 and abs(pos - b) <= window and lo <= pos and pos + len(sent) <= max(hi, e):
            spans[i] = (pos, pos + len(sent))
            report.note(
                "sentence_span_realigned",
                f"{where} sentence {i}: [{b}, {e}) -> [{pos}, {pos + len(sent)})",
            )


def _parse_spans(obj: dict, ctx: str, where: str) -> tuple[list[str], list[tuple[int, int]]]:
    sentences = require(obj, "sentences", list, where, "a list of sentence strings")
    raw = require(obj, "sentence_breaks", list, where, "a list of [begin, end] spans")
    if len(sentences) != len(raw) or not sentences:
        raise DataError(
            f"{where}: {len(sentences)} sentences but {len(raw)} sentence_breaks; "
            "expected one [begin, end] span per sentence and at least one sentence"
        )
    spans: list[tuple[int, int]] = []
    for i, (sent, span) in enumerate(zip(sentences, raw)):
        ok = (
            isinstance(span, list)
            and len(span) == 2
            and all(type(x) is int for x in span)
            and 0 <= span[0] <= span[1] <= len(ctx)
        )
        if not ok or not isinstance(sent, str):
            raise DataError(
                f"{where}: sentence {i}: span {span!r} / sentence {sent!r}: expected a "
                f"string and a [begin, end] span with 0 <= begin <= end <= {len(ctx)}"
            )
        if spans and span[0] < spans[-1][0]:
            raise DataError(
                f"{where}: sentence_breaks not in order at sentence {i} ({span} after "
                f"{list(spans[-1])}); expected increasing spans"
            )
        spans.append((span[0], span[1]))
    return sentences, spans


def _answer_sentence(para: Paragraph, qa: dict, qid: str, where: str, report: LoadReport) -> int:
    """Index of the sentence whose span contains the (first) answer start."""
    answers = require(qa, "answers", list, where, "a list of {answer_start, text}")
    if not answers or not isinstance(answers[0], dict):
        raise DataError(f"{where}: no answer; expected at least one {{answer_start, text}}")
    if len(answers) > 1:
        report.note("multiple_answers", f"{where}: {len(answers)} answers, first used")
    start = require(answers[0], "answer_start", int, f"{where} answers[0]", "an integer offset")
    text = require(answers[0], "text", str, f"{where} answers[0]", "the answer string")
    ctx, spans = para.context, para.breaks
    if para.context[start : start + len(text)] != text:
        report.note(
            "answer_text_mismatch",
            f"{where}: context at {start} is "
            f"{ctx[start : start + len(text)][:30]!r}, answer {text[:30]!r}",
        )
    i = bisect_right([b for b, _ in spans], start) - 1
    if i >= 0 and start < spans[i][1]:
        if start + len(text) > spans[i][1]:
            report.note("answer_crosses_sentence_break", f"{where}: {text[:40]!r}")
        return i
    if 0 <= start < len(ctx) and i + 1 < len(spans):
        report.note("answer_in_gap", f"{where}: start {start} before span {list(spans[i + 1])}")
        return i + 1
    raise DataError(
        f"{where}: answer_start {start} lies outside every sentence span (first "
        f"{list(spans[0])}, last {list(spans[-1])}, context length {len(ctx)}); "
        "expected a start inside a [begin, end) span of sentence_breaks"
    )


def _parse_paragraph(lf: LangFile, ai: int, pi: int, obj: object, where: str) -> Paragraph:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a paragraph object, got {type(obj).__name__}")
    ctx = require(obj, "context", str, where, "the paragraph text")
    if not ctx.strip():
        raise DataError(f"{where}: empty 'context'; expected the paragraph text")
    sentences, spans = _parse_spans(obj, ctx, where)
    para = Paragraph(ai, pi, ctx, sentences, spans)
    _check_paragraph(para, where, lf.report)
    _realign(para, where, lf.report)
    for qi, qa in enumerate(require(obj, "qas", list, where, "a list of questions")):
        qwhere = f"{where} qas[{qi}]"
        if not isinstance(qa, dict):
            raise DataError(f"{qwhere}: expected a question object, got {type(qa).__name__}")
        qid = require(qa, "id", str, qwhere, "the question id string")
        qwhere = f"{where} question id {qid!r}"
        text = require(qa, "question", str, qwhere, "the question text")
        if not text.strip():
            raise DataError(f"{qwhere}: empty 'question'; expected the question text")
        if qid in lf.questions:
            raise DataError(
                f"{qwhere}: question id appears twice in {lf.path.name}; expected "
                "unique ids per language file"
            )
        sent = _answer_sentence(para, qa, qid, qwhere, lf.report)
        lf.questions[qid] = Question(qid, text.strip(), ai, pi, sent)
    return para


def parse_file(path: Path, lang: str) -> LangFile:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected a SQuAD-style object with a 'data' list, got {type(data).__name__}"
        )
    articles = require(data, "data", list, str(path), "the list of articles")
    lf = LangFile(lang, path, LoadReport(str(path)))
    for ai, art in enumerate(articles):
        where = f"{path}: data[{ai}]"
        if not isinstance(art, dict):
            raise DataError(f"{where}: expected an article object, got {type(art).__name__}")
        title = art.get("title")
        if not isinstance(title, str) or not title:
            lf.report.note("missing_title", where)
            title = f"article-{ai}"
        paragraphs = require(art, "paragraphs", list, where, "a list of paragraphs")
        lf.titles.append(title)
        lf.paragraphs.append(
            [
                _parse_paragraph(lf, ai, pi, p, f"{where} ({title}) paragraphs[{pi}]")
                for pi, p in enumerate(paragraphs)
            ]
        )
    return lf
