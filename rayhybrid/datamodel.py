"""The data model shared by every stage (DESIGN.md, 'Data model').

- :class:`ParallelItem`: one meaning in several languages (training).
- :class:`Pair`: one query and one positive passage with their languages and a group id.
- :class:`EvalTask`: queries, candidates and relevance judgements (evaluation).
- :class:`LoadReport`: what a loader found odd, so nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "KNOWN_LANGUAGES",
    "Candidate",
    "DataError",
    "EvalTask",
    "LoadReport",
    "Pair",
    "ParallelItem",
    "Query",
    "check_language",
    "passage_text",
]

# ISO 639-1 codes we accept (the XQuAD-R / MLQA-R / MIRACL languages and other common ones).
KNOWN_LANGUAGES = frozenset(
    [
        "af",
        "am",
        "ar",
        "az",
        "be",
        "bg",
        "bn",
        "bs",
        "ca",
        "cs",
        "cy",
        "da",
        "de",
        "el",
        "en",
        "eo",
        "es",
        "et",
        "eu",
        "fa",
        "fi",
        "fr",
        "ga",
        "gl",
        "gu",
        "he",
        "hi",
        "hr",
        "ht",
        "hu",
        "hy",
        "id",
        "is",
        "it",
        "ja",
        "jv",
        "ka",
        "kk",
        "km",
        "kn",
        "ko",
        "ku",
        "ky",
        "la",
        "lo",
        "lt",
        "lv",
        "mk",
        "ml",
        "mn",
        "mr",
        "ms",
        "my",
        "ne",
        "nl",
        "no",
        "or",
        "pa",
        "pl",
        "ps",
        "qu",
        "pt",
        "ro",
        "ru",
        "sa",
        "sd",
        "si",
        "sk",
        "sl",
        "so",
        "sq",
        "sr",
        "su",
        "sv",
        "sw",
        "ta",
        "te",
        "th",
        "tl",
        "tr",
        "ug",
        "uk",
        "ur",
        "uz",
        "wo",
        "vi",
        "xh",
        "yi",
        "yo",
        "zh",
        "zu",
    ]
)


class DataError(ValueError):
    """Input data is malformed. The message names the file and the line or field."""


def check_language(code: str, where: str) -> str:
    """Return ``code`` if it is a known language code, else raise :class:`DataError`."""
    if code not in KNOWN_LANGUAGES:
        raise DataError(
            f"{where}: unknown language code {code!r}; expected an ISO 639-1 code such as "
            "'en', 'de', 'zh'"
        )
    return code


@dataclass(frozen=True)
class ParallelItem:
    """One meaning in several languages.

    Attributes:
        id: the item id (shared by all its languages).
        queries: language -> query text.
        positives: language -> positive passages (first one is used for training).
        negatives: language -> hard negative passages (optional).
        article: the article / document the item came from (unit of splitting).
    """

    id: str
    queries: dict[str, str]
    positives: dict[str, tuple[str, ...]]
    negatives: dict[str, tuple[str, ...]] = field(default_factory=dict)
    article: str = ""

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages that have both a query and a positive, sorted."""
        return tuple(sorted(set(self.queries) & {k for k, v in self.positives.items() if v}))


@dataclass(frozen=True)
class Pair:
    """A query and a positive passage. ``group`` ties pairs of one parallel item together."""

    query: str
    passage: str
    query_lang: str
    passage_lang: str
    group: str
    article: str = ""


@dataclass(frozen=True)
class Query:
    id: str
    lang: str
    text: str


@dataclass(frozen=True)
class Candidate:
    """One retrievable passage.

    ``title`` is set only by formats that define a passage title (BEIR / MIRACL); LAReQA
    candidates have none (XQuAD-R's article titles are the English page names in every
    language, so encoding them would leak the article across languages). ``article`` is
    the split unit the candidate came from (LAReQA article key), never encoded.
    """

    id: str
    lang: str
    text: str
    context: str = ""
    title: str = ""
    article: str = ""

    def passage(self, with_context: bool = False, with_title: bool = True) -> str:
        """The text encoded for this candidate (see :func:`passage_text`)."""
        return passage_text(
            self.text, self.context, self.title, with_context=with_context, with_title=with_title
        )


def passage_text(
    text: str,
    context: str = "",
    title: str = "",
    *,
    with_context: bool = False,
    with_title: bool = True,
) -> str:
    """The one recipe for the text of a passage, in training and in evaluation alike.

    ``text`` is the passage (a LAReQA answer sentence, a BEIR document text);
    ``with_context`` appends its paragraph (LAReQA's "sentence + context" variant);
    ``with_title`` puts a format-defined title in front, as BEIR does (``title + " " +
    text``). Only formats that define titles pass one; LAReQA passes none.
    """
    out = f"{title} {text}" if with_title and title else text
    if with_context and context:
        out = f"{out} {context}"
    return out


@dataclass
class EvalTask:
    """Queries, a candidate pool and relevance judgements.

    Query ids and candidate ids live in separate id spaces (loaders prefix them),
    so no query id ever equals a candidate id.
    """

    name: str
    queries: list[Query]
    candidates: list[Candidate]
    qrels: dict[str, dict[str, int]]  # query id -> {candidate id: relevance}
    report: LoadReport = field(default_factory=lambda: LoadReport(""))

    @property
    def languages(self) -> list[str]:
        return sorted({c.lang for c in self.candidates} | {q.lang for q in self.queries})


@dataclass
class LoadReport:
    """Counts of what was odd in a load; printed and logged, never silently swallowed."""

    source: str
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, example: str = "", keep: int = 3) -> None:
        self.counts[kind] += 1
        if example and len(self.examples.setdefault(kind, [])) < keep:
            self.examples[kind].append(example)

    def merge(self, other: LoadReport) -> None:
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            self.examples.setdefault(k, []).extend(v[: max(0, 3 - len(self.examples.get(k, [])))])

    def summary(self) -> str:
        if not self.counts:
            return f"{self.source}: nothing odd"
        parts = [f"{k}={v}" for k, v in sorted(self.counts.items())]
        return f"{self.source}: " + ", ".join(parts)
