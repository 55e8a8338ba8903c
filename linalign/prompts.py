"""Building the branches of a prompt: what each branch of Linear Alignment sees.

A ``ChatFormat`` renders one conversation with or without a principle: with a chat
template, the principle goes into the system message after the base system text (the
template's own default when none is given, found by ``template_default_system``); without
one, ``principle + "\\n\\n" + prompt`` against ``prompt``. ``branch_ids`` gives the prompt ids
of every branch of a batch: K principle groups and the base group, one row per prompt.
Choices and why: docs/decoder.md, "The branches".

Also the checks of text input (``texts``, ``principle_lists``) and of prompt ids
(``id_rows``), and ``decode_text``, the one way ids become text.
"""
from __future__ import annotations

import numbers
from typing import Sequence


def template_default_system(tokenizer) -> str | None:
    """The system text a chat template inserts when the conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM..."), found by rendering both ways; None
    when it inserts none or takes no system role."""
    mark, user = "\x00linalign-mark\x00", [{"role": "user", "content": "x"}]
    try:
        marked = render(tokenizer, [{"role": "system", "content": mark}] + user)
    except Exception:  # template without a system role
        return None
    plain = render(tokenizer, user)
    head, _, tail = marked.partition(mark)
    if plain.startswith(head) and plain.endswith(tail) and len(plain) > len(head + tail):
        return plain[len(head):len(plain) - len(tail)]
    return None


def render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class ChatFormat:
    """How the branches of a conversation are written for one tokenizer.

    ``system``: base system text that every branch carries (None: the chat template's own
    default system message, if it has one). The principle goes after it in the principle
    branch's system message, separated by a space. Without a chat template the branches are
    ``principle + "\\n\\n" + prompt`` and ``prompt`` (with ``system + "\\n\\n"`` in front of
    both when given)."""

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer = tokenizer
        self.system = system
        self.has_template = getattr(tokenizer, "chat_template", None) is not None
        self.default_system = template_default_system(tokenizer) if self.has_template \
            else None

    def text(self, prompt: str, principle: str | None) -> str:
        """The text of one branch: the conversation with ``principle`` in the system
        message, or without it (``principle=None``)."""
        if not self.has_template:
            text = prompt if principle is None else principle + "\n\n" + prompt
            return text if self.system is None else self.system + "\n\n" + text
        system = self.system if self.system is not None else self.default_system
        if principle is not None:
            system = principle if not system else system + " " + principle
        messages = ([] if system is None else [{"role": "system", "content": system}]) + \
            [{"role": "user", "content": prompt}]
        return render(self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        # A rendered chat template already holds its special tokens.
        return self.tokenizer(text, add_special_tokens=not self.has_template)["input_ids"]

    def ids(self, prompt: str, principle: str | None) -> list[int]:
        return self.encode(self.text(prompt, principle))

    def branch_ids(self, prompts, principle) -> list[list[list[int]]]:
        """The prompt ids of every branch: K principle groups, then the base group, each one
        row per prompt. ``principle``: one string, one per prompt, or one list of K per
        prompt."""
        prompts = texts("prompt", prompts)
        per_prompt = principle_lists(principle, len(prompts))
        K = len(per_prompt[0])
        groups = [[self.ids(q, ps[k]) for q, ps in zip(prompts, per_prompt)]
                  for k in range(K)]
        return groups + [[self.ids(q, None) for q in prompts]]

    def plain_ids(self, prompts, principle=None) -> list[list[int]]:
        """One branch per prompt: the conversation with ``principle`` (one, or one per
        prompt) in the system message, or without one."""
        prompts = texts("prompt", prompts)
        principles = [None] * len(prompts) if principle is None else \
            texts("principle", principle, len(prompts))
        return [self.ids(q, p) for q, p in zip(prompts, principles)]


def decode_text(tokenizer, ids) -> str:
    """Generated ids as text, special tokens skipped. No clean-up of spaces: it rewrites
    earlier text (streamed pieces must add up) and is meant for WordPiece vocabularies, not
    the byte-level BPE of causal LMs."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def id_list(name: str, row) -> list[int]:
    """One row of token ids as a list of ints: a 1-D integer tensor or a sequence of Python
    ints. Floats, bools and strings are refused (``TypeError``): ``int()`` would silently
    truncate 7.9 to 7 or read "12" as 12."""
    import torch

    if isinstance(row, torch.Tensor):
        if row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids; got a {row.dtype} tensor")
        return row.tolist()
    if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
        raise TypeError(f"{name} must be a list of token ids (ints); got "
                        f"{type(row).__name__}")
    row = list(row)
    for x in row:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):  # numpy ints are
            raise TypeError(f"{name} must hold integer token ids; got {x!r} "
                            f"({type(x).__name__})")
    return [int(x) for x in row]


def id_rows(name: str, rows, vocab: int) -> list[list[int]]:
    """Prompt ids (lists of ints, one per row, or a [B, L] / [L] tensor) as lists, checked:
    at least one row, no empty row, every id in ``[0, vocab)``."""
    import torch

    if isinstance(rows, torch.Tensor):
        rows = list(rows) if rows.dim() == 2 else [rows]
    rows = [id_list(f"{name}[{i}]", r) for i, r in enumerate(rows)]
    if not rows:
        raise ValueError(f"no prompts given: {name} has no rows (pass one list of prompt ids "
                         "per prompt)")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"{name}[{i}] is empty: every prompt needs at least one token "
                             "(a row of prompt ids per prompt)")
        # An id outside the embedding would fail deep in the model (on a GPU, as a
        # device-side assert that breaks the CUDA context): refuse it here.
        if min(r) < 0 or max(r) >= vocab:
            bad = next(x for x in r if not 0 <= x < vocab)
            raise ValueError(f"{name}[{i}] holds token id {bad}, outside the model's "
                             f"vocabulary [0, {vocab})")
    return rows


def principle_lists(principle, n: int) -> list[list[str]]:
    """One list of K principles per prompt (the same K for all): ``principle`` is one
    string, one per prompt, or one list of strings per prompt."""
    if isinstance(principle, Sequence) and not isinstance(principle, str) and principle and \
            any(isinstance(p, (list, tuple)) for p in principle):
        if len(principle) != n:
            raise ValueError(f"{len(principle)} principle lists for {n} prompts: pass one "
                             "list of principles per prompt")
        rows = [[p] if isinstance(p, str) else texts("principle", p) for p in principle]
        ks = sorted({len(r) for r in rows})
        if len(ks) > 1:
            raise ValueError(f"every prompt of a call needs the same number of principles; "
                             f"got {ks}: group the prompts by their number of principles")
        return rows
    return [[p] for p in texts("principle", principle, n)]


def texts(name: str, value, n: int | None = None) -> list[str]:
    """A string or a list of non-empty strings, as a list (of ``n`` when given)."""
    if isinstance(value, str):
        value = [value] * (n or 1)
    elif not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string or a list of strings; got "
                        f"{type(value).__name__}")
    value = list(value)
    if not value:
        raise ValueError(f"no {name}s given: pass a string or a non-empty list of strings")
    if n is not None and len(value) != n:
        raise ValueError(f"{len(value)} {name}s for {n} prompts: pass one {name}, or one "
                         "per prompt")
    for i, v in enumerate(value):
        if not v.strip():
            if name == "principle":
                raise ValueError(
                    f"principle {i} is empty (or only whitespace): both branches would be "
                    "the same conversation and Linear Alignment would change nothing; give "
                    "the principle in plain words (decoding without any principle: "
                    "generate_plain with principle=None)")
            raise ValueError(f"{name} {i} is empty (or only whitespace): give the user's "
                             "message (generate_ids takes any non-empty prompt ids)")
    return value
