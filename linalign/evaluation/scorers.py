"""The principles of the evaluation and the programs that score them: no judge model.

Each ``Principle`` is a preference in plain words (put in the system message) and a test of
an answer's text and finish reason ("eos": it ended; "length": cut at max_new_tokens).
The text tests below (language, capital letters, marker words of a style, a required word,
a closing question, digits, list items, the first word, contractions, emojis) are what the
tests call; ``PRINCIPLES`` holds the 12 principles by name, in the order of the tables.
What each rule accepts and why: docs/eval.md, "Principles and their scorers".
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

# Words: runs of letters, with inner apostrophes kept ("don't", "cookin'" keeps its trailing
# apostrophe only through the contraction patterns below).
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
_APOS = "['\u2019]"

#: Frequent function words of each language, disjoint (no word in both lists), so a count
#: tells the languages apart even in a 30-word answer. Words that are common in both (a,
#: on, me, plus, son, six) are in neither.
FRENCH_WORDS = frozenset("""
le la les un une des du de et est sont ou mais donc car ni que qui quoi dont au aux ce
cet cette ces il ils elle elles je tu nous vous leur leurs mon ma mes ton ta tes notre
votre vos pour par avec sans dans sur sous entre chez vers pas ne très aussi bien tout
tous toute toutes être avoir fait faire peut peuvent comme quand où y en se sa ses lui
c'est n'est qu'il j'ai d'un d'une l'eau voici ici alors puis ensuite bonjour merci oui
""".split())
ENGLISH_WORDS = frozenset("""
the and is are was were be been being of to in it its you your yours that this these
those with for from by at as or but not no yes if then than so do does did have has had
can could will would should may might must what which who whom how why when where there
here they them their we our us he him his she her i my an any some all each every into
about over under after before very just also only more most other such while because
""".split())


def words(text: str) -> list[str]:
    """The words of ``text`` (letters, inner apostrophes kept), in order."""
    return _WORD.findall(text)


def word_count(text: str) -> int:
    """Whitespace-separated pieces holding a letter or a digit ("-" bullets do not count,
    "20" does)."""
    return sum(1 for w in text.split() if any(c.isalnum() for c in w))


def has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def language_counts(text: str) -> tuple[int, int]:
    """(French function words, English function words) in ``text``; apostrophes are
    normalised to ' and "l'eau" also counts as "l'"."""
    fr = en = 0
    for w in words(text.replace("\u2019", "'").lower()):
        if w in FRENCH_WORDS or (len(w) > 2 and w[1] == "'" and w[0] in "cdjlmnst"):
            fr += 1
        elif w in ENGLISH_WORDS:
            en += 1
    return fr, en


def is_french(text: str) -> bool:
    """At least 3 French function words and more than twice as many as English ones."""
    fr, en = language_counts(text)
    return fr >= 3 and fr > 2 * en


def uppercase_ratio(text: str) -> tuple[float, int]:
    """(uppercase letters / cased letters, number of cased letters)."""
    cased = [c for c in text if c.isupper() or c.islower()]
    if not cased:
        return 0.0, 0
    return sum(c.isupper() for c in cased) / len(cased), len(cased)


def is_capitals(text: str) -> bool:
    """At least 10 cased letters, and 90 % or more of them upper case."""
    ratio, n = uppercase_ratio(text)
    return n >= 10 and ratio >= 0.9


PIRATE_MARKERS = re.compile(
    r"\b(?:ar+r+|ahoy|avast|aye|ye|yer|mate|matey|mateys|me\s+hearty|me\s+hearties|hearties|"
    r"landlubbers?|buccaneers?|scallywags?|shiver\s+me\s+timbers|booty|yo[\s-]*ho|"
    r"sea\s*dogs?|grog|doubloons?|savvy|blimey)\b"
    # dropped g: "sailin'", "cookin'" (a letter run ending in in' and not inside a word)
    r"|\b[^\W\d_]+in['\u2019](?![^\W\d_])", re.IGNORECASE)


def pirate_markers(text: str) -> int:
    """Occurrences of pirate marker words (arr, ahoy, aye, ye, mate, matey, me hearties,
    ..., and dropped-g words like sailin')."""
    return len(PIRATE_MARKERS.findall(text))


SHAKESPEARE_MARKERS = re.compile(
    r"\b(?:thou|thee|thy|thine|hath|doth|dost|hast|art\s+thou|shalt|wilt|canst|wouldst|"
    r"couldst|shouldst|ere|forsooth|prithee|methinks|verily|wherefore|hither|thither|"
    r"whence|anon|nay|alas|fie|o'er|'tis|'twas|mayhap|perchance)\b", re.IGNORECASE)


def shakespeare_markers(text: str) -> int:
    """Occurrences of Early Modern English markers (thou, thee, thy, hath, doth, ...)."""
    return len(SHAKESPEARE_MARKERS.findall(text.replace("\u2019", "'")))


def has_word(text: str, word: str) -> bool:
    """``word`` (or its plural with s/es) as a whole word, any case."""
    return re.search(rf"\b{re.escape(word)}(?:e?s)?\b", text, re.IGNORECASE) is not None


_TRAILING = " \t\r\n\"'\u2019\u201d)*_`]"


def ends_with_question(text: str) -> bool:
    """The last character, after closing quotes, brackets and markdown, is '?'."""
    return text.rstrip(_TRAILING).endswith(("?", "\uff1f"))


def has_digit(text: str) -> bool:
    """Any decimal digit, in any script (unicodedata category Nd)."""
    return any(unicodedata.category(c) == "Nd" for c in text)


_LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022\u2013]|\d{1,3}[.)])\s+\S", re.MULTILINE)


def list_items(text: str) -> int:
    """Lines that start with a bullet (- * + or a bullet sign) or a number and '.' / ')',
    followed by text."""
    return len(_LIST_ITEM.findall(text))


def first_word(text: str) -> str:
    """The first word, lower case, after any leading punctuation or markdown."""
    w = words(text)
    return w[0].lower().replace("\u2019", "'") if w else ""


CONTRACTIONS = re.compile(
    rf"\b[^\W\d_]+(?:n{_APOS}t|{_APOS}(?:re|ve|ll|m|d))\b"
    rf"|\b(?:it|that|there|here|what|who|where|when|why|how|he|she|let|this|everyone|"
    rf"nobody|someone|something|everything){_APOS}s\b", re.IGNORECASE)


def contractions(text: str) -> int:
    """Occurrences of contractions: n't, 're, 've, 'll, 'm, 'd, and 's after pronouns and
    question words (it's, that's, let's, ...; possessives like "the dog's" do not count)."""
    return len(CONTRACTIONS.findall(text))


_EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x2300, 0x23FF),
                 (0x1F1E6, 0x1F1FF))


def emoji_count(text: str) -> int:
    """Characters in the emoji blocks (pictographs, emoticons, transport, symbols and
    dingbats, flags)."""
    return sum(1 for c in text if any(lo <= ord(c) <= hi for lo, hi in _EMOJI_RANGES))


# ============================================================================ principles
@dataclass(frozen=True)
class Principle:
    """A preference in plain words (``text``, put in the system message) and the program
    that decides whether an answer follows it: ``check(answer_text, finish_reason)``;
    ``finish_reason`` is "eos" (the answer ended) or "length" (cut at max_new_tokens).
    ``rule`` says in one line what ``check`` tests."""
    name: str
    text: str
    rule: str
    check: Callable[[str, str], bool]

    def __call__(self, text: str, finish_reason: str = "eos") -> bool:
        return bool(self.check(text, finish_reason))


#: Answers of at most this many words pass "brief"; with max_new_tokens 48 an answer that
#: long (about 25 to 35 tokens) has room to end with its end-of-turn token.
BRIEF_WORDS = 20

_ALL = [
    Principle("french", "Always answer in French, never in English.",
              "at least 3 French function words and more than twice as many as English ones",
              lambda t, f: is_french(t)),
    Principle("capitals", "Write your whole answer in capital letters.",
              "at least 10 cased letters, 90 % or more upper case",
              lambda t, f: is_capitals(t)),
    Principle("pirate", "Talk like a pirate.",
              "at least 2 pirate markers (arr, ahoy, aye, ye, mate, matey, me hearties, "
              "sailin', ...)",
              lambda t, f: pirate_markers(t) >= 2),
    Principle("shakespeare", "Speak like a character in a Shakespeare play.",
              "at least 2 Early Modern English markers (thou, thee, thy, hath, doth, ...)",
              lambda t, f: shakespeare_markers(t) >= 2),
    Principle("banana", "Mention bananas in your answer.",
              "the word banana or bananas, any case",
              lambda t, f: has_word(t, "banana")),
    Principle("brief", f"Answer in at most {BRIEF_WORDS} words.",
              f"the answer ended (not cut at max_new_tokens) with 1 to {BRIEF_WORDS} words",
              lambda t, f: f == "eos" and 1 <= word_count(t) <= BRIEF_WORDS),
    Principle("question", "End your answer with a question for the user.",
              "the answer ended (not cut) and its last character is '?' (after closing "
              "quotes and markdown)",
              lambda t, f: f == "eos" and ends_with_question(t)),
    Principle("no-digits", "Never use digits; write all numbers out in words.",
              "letters and no digit (0-9 or any other script's)",
              lambda t, f: has_letters(t) and not has_digit(t)),
    Principle("bullets", "Format your answer as a bulleted list.",
              "at least 2 lines starting with a bullet (- * + \u2022) or '1.' / '1)'",
              lambda t, f: list_items(t) >= 2),
    Principle("indeed", "Begin your answer with the word 'Indeed'.",
              "the first word is 'indeed' (any case, after leading punctuation)",
              lambda t, f: first_word(t) == "indeed"),
    Principle("formal", "Write formally and never use contractions.",
              "at least 3 words and no contraction (n't 're 've 'll 'm 'd, it's, that's, ...)",
              lambda t, f: len(words(t)) >= 3 and contractions(t) == 0),
    Principle("emoji", "Use emojis in your answer.",
              "at least one emoji character",
              lambda t, f: emoji_count(t) >= 1),
]
#: The principles, by name, in the order of the tables.
PRINCIPLES: dict[str, Principle] = {p.name: p for p in _ALL}
