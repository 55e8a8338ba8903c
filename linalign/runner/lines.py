"""The input of ``linalign run``: one JSON object per line, checked into a ``Row``.

Numbers are checked with the rules of ``linalign.options`` (``check_number``,
``check_int``), so a line's ``ratio``, ``kl_budget``, ``seed``, ``max_new_tokens``, penalties
and ``no_repeat_ngram_size`` have exactly the bounds of ``LinearAligner.generate`` and of the
command-line options.
Format: docs/run.md, "Input".
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..options import NEUTRAL_PENALTIES, RULES, check_int, check_number

#: Fields an input line may have. Anything else is reported (a typo like "principles" or
#: "max_tokens" would otherwise be silently ignored).
FIELDS = ("id", "prompt", "principle", "ratio", "kl_budget", "seed", "max_new_tokens",
          *NEUTRAL_PENALTIES, "no_repeat_ngram_size")


@dataclass
class Row:
    """One valid input line."""
    id: object                  # as given: a str or an int
    key: str                    # str(id): how ids are compared (1 and "1" are the same id)
    line: int                   # 1-based line number in the input file
    prompt: str
    principles: list[str]
    ratio: list[float] | None = None   # one per principle, or None (the command's default)
    kl_budget: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    penalties: dict | None = None      # the penalties the line gives (name -> value)
    no_repeat_ngram_size: int | None = None

    @property
    def length(self) -> int:
        """Characters of the prompt and principles: the batching proxy for prompt tokens
        (needs no tokenizer pass)."""
        return len(self.prompt) + sum(len(p) for p in self.principles)


def _quoted(name: str, error: Exception) -> str:
    """``options``' message ("seed must be ...") with the field's name quoted, as the line
    spells it."""
    text = str(error)
    return f'"{name}"{text[len(name):]}' if text.startswith(name + " ") else \
        f'"{name}": {text}'


def field_number(obj: dict, name: str) -> float:
    """The real field ``name`` of a line, checked against ``RULES[name]``."""
    try:
        return check_number(name, obj[name], "a number")
    except (TypeError, ValueError) as e:
        raise ValueError(_quoted(name, e)) from None


def field_int(obj: dict, name: str) -> int:
    """The integer field ``name`` of a line, checked against ``INT_RULES[name]``."""
    try:
        return check_int(name, obj[name])
    except (TypeError, ValueError) as e:
        raise ValueError(_quoted(name, e)) from None


def line_ratios(value, K: int) -> list[float]:
    """A line's ``ratio``: one number for all K principles, or a list of K."""
    values = value if isinstance(value, list) else [value] * K
    try:
        if len(values) != K:
            raise ValueError(f"{len(values)} ratios for {K} principles")
        return [check_number("ratio", x, "a number") for x in values]
    except (TypeError, ValueError):
        raise ValueError(f'"ratio" must be a number ({RULES["ratio"].words}) or a list of {K} '
                         f"(one per principle); got {value!r}") from None


def _check_shape(obj):
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object {{\"id\": ..., \"prompt\": ..., "
                         f"\"principle\": ...}}; got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (the fields are {', '.join(FIELDS)})")
    for name in ("id", "prompt", "principle"):
        if name not in obj:
            raise ValueError(f"missing {name!r}")


def _texts(obj) -> tuple[object, str, list[str]]:
    """The id, the prompt and the principles of a line, checked."""
    i = obj["id"]
    if isinstance(i, bool) or not isinstance(i, (str, int)) or \
            (isinstance(i, str) and not i.strip()):
        raise ValueError(f"\"id\" must be a non-empty string or an integer; got {i!r}")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise ValueError(f"\"prompt\" must be a string; got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("\"prompt\" is empty")
    p = obj["principle"]
    principles = [p] if isinstance(p, str) else p
    if not isinstance(principles, list) or not principles or \
            not all(isinstance(x, str) for x in principles):
        raise ValueError("\"principle\" must be a string or a non-empty list of strings; got "
                         f"{p!r}")
    if not all(x.strip() for x in principles):
        raise ValueError("a principle is empty: with an empty principle both branches are the "
                         "same conversation")
    return i, prompt, list(principles)


def parse_line(obj, line: int) -> Row:
    """An input line's JSON value as a ``Row``; ``ValueError`` saying what is wrong."""
    _check_shape(obj)
    i, prompt, principles = _texts(obj)
    K = len(principles)
    row = Row(i, str(i), line, prompt, principles)
    if "ratio" in obj:
        row.ratio = line_ratios(obj["ratio"], K)
    if "kl_budget" in obj:
        budget = field_number(obj, "kl_budget")
        if row.ratio is not None:
            raise ValueError("give \"ratio\" or \"kl_budget\", not both (kl mode derives the "
                             "ratio from the budget)")
        if K > 1:
            where = 'docs/semantics.md, "kl mode"'
            raise ValueError(f"\"kl_budget\" is for one principle ({where}); this line has "
                             f"{K}: give \"ratio\" instead")
        row.kl_budget = budget
    if "seed" in obj:
        row.seed = field_int(obj, "seed")
    if "max_new_tokens" in obj:
        row.max_new_tokens = field_int(obj, "max_new_tokens")
    given = [name for name in NEUTRAL_PENALTIES if name in obj]
    if given:
        row.penalties = {name: field_number(obj, name) for name in given}
    if "no_repeat_ngram_size" in obj:
        row.no_repeat_ngram_size = field_int(obj, "no_repeat_ngram_size")
    return row


def unencodable(row: Row) -> str | None:
    """Where a row's text cannot be written as UTF-8 (a lone surrogate, from a ``\\ud800``
    escape), in words, or None."""
    for name, text in [("id", row.id), ("prompt", row.prompt)] + \
            [("principle", p) for p in row.principles]:
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f'a lone surrogate \\u{ord(text[e.start]):04x} in "{name}" at character ' \
                f"{e.start}"
    return None


def _parsed(raw: bytes, n: int) -> Row:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start}): save the file as "
                         "UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("not a line of this format (JSON nested too deeply)") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise ValueError(f"not a line of this format (a number too long: "
                         f"{str(e).split(':')[0]})") from None
    try:
        row = parse_line(obj, n)
        where = unencodable(row)
        if where:
            raise ValueError(f"text that is not valid Unicode ({where}): it cannot be "
                             "written as UTF-8")
    except ValueError as e:
        named = isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) and \
            not isinstance(obj.get("id"), bool)
        raise ValueError(f"id {shown_id(obj['id'])}: {e}" if named else str(e)) from None
    return row


def shown_id(i) -> str:
    """An id as a message shows it: its repr (escapes included), cut to 40 characters."""
    text = repr(i)
    return text if len(text) <= 40 else text[:37] + "..."


#: Byte-order marks of encodings other than UTF-8 (a file saved as UTF-16 or UTF-32).
OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
              (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
UTF8_BOM = b"\xef\xbb\xbf"


def read_input(path) -> tuple[list[Row], list[tuple[int, str]]]:
    """The valid rows of a JSON-lines file, in file order, and the problems of the others as
    ``(line number, message)``. Blank lines are neither rows nor problems; a duplicate id is
    a problem (the first line keeps it). A UTF-8 byte-order mark at the start is skipped;
    a file that starts with a UTF-16 or UTF-32 one is a ``ValueError`` (every line would
    be rejected)."""
    rows, problems, seen = [], [], {}
    with open(path, "rb") as f:
        data = f.read()
    for bom, name in OTHER_BOMS:
        if data.startswith(bom):
            raise ValueError(f"{path} is {name} text (it starts with a {name} byte-order "
                             "mark): save it as UTF-8")
    data = data.removeprefix(UTF8_BOM)
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = _parsed(raw, n)
        except ValueError as e:
            problems.append((n, str(e)))
            continue
        if row.key in seen:
            problems.append((n, f"id {row.id!r} is already on line {seen[row.key]} (every id "
                             "must be unique)"))
            continue
        seen[row.key] = n
        rows.append(row)
    return rows, problems
