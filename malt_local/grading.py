"""Deterministic answer extraction and grading: the paper's extractor T and reward R.

MALT rewards every refiner leaf with an exact match of its extracted answer against the ground
truth (paper §4.2). The paper gives no extractor or normalisation, so this module fixes one and
keeps it free of any model: the same output always gets the same reward, which is what makes
stored trees, resumed runs and exported datasets reproducible.

Every role's prompt asks for a last line ``Final Answer: X``. Extraction therefore trusts the
*last* such line first and only then falls back to task-specific conventions (``\\boxed{}`` for
MATH, ``#### N`` / the last number for GSM8K, ``answer is (B)`` for CommonsenseQA), because small
instruct models drift between those formats.

Tasks:

- ``gsm8k``: the answer is a number; compared numerically (absolute tolerance 1e-6).
- ``math``: a LaTeX expression; compared with ``math_verify`` (symbolic / numeric equivalence),
  with normalised-string equality as a fast path and as the fallback when parsing fails.
- ``csqa``: an option letter; the model may also state the option text, which is mapped back to
  its letter through ``options``.
- ``exact``: any string; compared case-insensitively, whitespace-collapsed, trailing punctuation
  stripped.
- ``judge``: free-form answers no rule can check ("Why is Paris significant?"). There is no
  deterministic grade: a run's leaf rewards for this task come from the LLM judge
  (`malt_local.run.judge`), and the tree stores them as NULL until it has judged. The functions here
  treat it like ``exact`` (the stated answer is still extracted and recorded, and voting can
  group equal answers), so ``grade`` on a judge question is only a rough exact-match check.

All public functions are pure and safe to call from any thread: ``math_verify`` implements its
timeouts with ``SIGALRM``, which only works in the main thread, so timeouts are used there and
disabled elsewhere (answers longer than ``_MATH_VERIFY_MAX_CHARS`` never reach ``math_verify``,
which bounds the work it can be asked to do).
"""

from __future__ import annotations

import logging
import math
import os
import re
import string
import threading
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

TASKS = ("gsm8k", "math", "csqa", "exact", "judge")
# Tasks without rules of their own, and the task whose rules stand in for theirs.
_RULES_OF = {"judge": "exact"}

Options = Sequence[tuple[str, str]] | None

# Seconds math_verify may spend parsing one answer / comparing one pair (main thread only).
_PARSE_TIMEOUT_S = 5
_VERIFY_TIMEOUT_S = 5
# Longer "answers" are rambling text, not expressions: compare them as strings only.
_MATH_VERIFY_MAX_CHARS = 400
_NUMBER_ABS_TOL = 1e-6


# --------------------------------------------------------------------------------------------
# Markers and shared regexes
# --------------------------------------------------------------------------------------------

_BOLD = r"(?:\*\*|__)?"
# Bold markup and the blanks after it. Two blank runs with only an optional token between them
# (`[ \t]*(?:\*\*)?[ \t]*`) make the regex engine try every split of a long run of blanks: a
# line of 50,000 spaces took 28 s to grade (found by tests/test_fuzz.py). Blanks belong to the
# token before them instead, so a run of blanks is matched one way only.
_BOLD_BLANKS = r"(?:(?:\*\*|__)[ \t]*)?"
# "Final Answer: X", "**Final Answer:** X", "**Final Answer**: X", "Final answer - X",
# "The final answer is X", "final answer = X". The separator is required so that prose such as
# "let me check the final answer again" is not mistaken for an answer line.
_FINAL_INLINE_RE = re.compile(
    rf"\bfinal\s+answer\b[ \t]*{_BOLD_BLANKS}(?:is\b[ \t]*:?|[:=]|[-\u2013\u2014](?!\d))"
    rf"[ \t]*{_BOLD}",
    re.IGNORECASE,
)
# "### Final Answer" or "**Final Answer**" alone on its line; the answer follows below.
_FINAL_HEADING_RE = re.compile(
    rf"^[ \t]*(?:#+[ \t]*)?{_BOLD_BLANKS}final\s+answer[ \t]*{_BOLD_BLANKS}(?::[ \t]*)?"
    rf"{_BOLD_BLANKS}$",
    re.IGNORECASE | re.MULTILINE,
)
# "the answer is X", "the correct option is (B)", "Answer: X" (fallback, not a Final Answer).
_ANSWER_IS_RE = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is|would\s+be|should\s+be|will\s+be|:)[ \t]*:?[ \t]*",
    re.IGNORECASE,
)
# A leading phrase inside a candidate: "Final Answer: The answer is 5" -> "5".
_LEADING_PHRASE_RE = re.compile(
    r"^(?:so,?\s+|thus,?\s+|therefore,?\s+)?(?:the\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?"
    r"(?:answer|option|choice)\s*(?:is|would\s+be|should\s+be|:)\s*:?\s*",
    re.IGNORECASE,
)
_GSM8K_HASHES_RE = re.compile(r"^[ \t]*####[ \t]*(.+)$", re.MULTILINE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
_TRAILING_PUNCT = ".,;:!?\u3002"

# A number as people write it: "1,000", "18", "18.50", ".5", "-3". A minus only counts as a
# sign when it does not follow a word or a digit, so "8-3" yields 8 and 3, not 8 and -3.
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?!\.\d))?|"
    r"(?:(?<![\w)\]])-)?(?<!\d)\.\d+"
)


# --------------------------------------------------------------------------------------------
# Cleaning helpers
# --------------------------------------------------------------------------------------------


def _check_task(task: str) -> None:
    """Fail loudly on a misspelt task: silently grading everything 0 would poison a dataset."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def last_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{...}`` (or ``\\fbox``), braces balanced.

    A regex cannot match nested braces, and MATH answers nest them all the time
    (``\\boxed{\\frac{\\sqrt{3}}{2}}``), so this scans.
    """
    found: str | None = None
    pos = 0
    while True:
        m = _BOXED_RE.search(text, pos)
        if m is None:
            return found
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        found = text[i + 1 : j]
                        pos = j + 1
                        break
            else:  # unbalanced: take the rest, a truncated generation is still an answer
                found = text[i + 1 :]
                return found
        else:  # "\boxed 5"
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                found = tok.group(0)
            pos = i + (tok.end() if tok else 0) + 1


def _strip_markdown(s: str) -> str:
    """Drop emphasis and code markers that models wrap around answers (``**B**``, `` `5` ``)."""
    s = s.strip()
    prev = None
    while prev != s:
        prev = s
        for mark in ("**", "__", "`", "*"):
            if s.startswith(mark):
                s = s[len(mark) :].strip()
            if s.endswith(mark):
                s = s[: -len(mark)].strip()
    return s.replace("**", "")


def _strip_math_delimiters(s: str) -> str:
    """Keep the first math span when the candidate opens with ``$``, ``$$``, ``\\(`` or ``\\[``.

    "Final Answer: $\\frac{1}{2}$ of the pie." states ``\\frac{1}{2}``; the prose after the span
    is not part of the answer.
    """
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(open_):
            end = s.find(close, len(open_))
            if end == -1:  # "$18" (a dollar sign, not math) or a truncated span
                return s[len(open_) :].strip()
            return s[len(open_) : end].strip()
    if s.endswith("$") and s.count("$") == 1:
        return s[:-1].strip()
    return s


def _clean_candidate(s: str) -> str:
    """Reduce the text after an answer marker to the bare answer, for every task alike."""
    s = s.strip()
    for _ in range(3):  # a few rounds: "**$\boxed{5}$.**" needs several layers peeled
        before = s
        s = _strip_markdown(s)
        s = _LEADING_PHRASE_RE.sub("", s, count=1).strip()
        boxed = last_boxed(s)
        if boxed is not None:
            s = boxed.strip()
        s = _strip_math_delimiters(s)
        s = s.rstrip(_TRAILING_PUNCT + " \t").strip()
        if s == before:
            break
    return s.strip()


def _text_after(text: str, start: int) -> str:
    """The answer text that follows a marker ending at ``start``.

    Usually the rest of the line; when that is empty (``### Final Answer`` or a lone ``$$``) the
    next paragraph, so ``\\boxed{}`` on the following display-math lines is still found.
    """
    rest = text[start:]
    line, _, below = rest.partition("\n")
    bare = line.replace("$$", "").replace("\\[", "").replace("\\]", "")
    if _clean_candidate(bare):
        if line.count("$$") == 1 or ("\\[" in line and "\\]" not in line):
            # Display math opened on this line continues below: keep the paragraph.
            return re.split(r"\n[ \t]*\n", rest, maxsplit=1)[0].replace("\n", " ")
        return line
    para = re.split(r"\n[ \t]*\n", below.lstrip(), maxsplit=1)[0]
    return para.replace("\n", " ")


def _first_sentence(s: str) -> str:
    """Cut prose after the stated answer: "18 dollars. Next she ..." -> "18 dollars"."""
    s = s.split("\n", 1)[0]
    if s.lstrip().startswith(("$", "\\(", "\\[", "\\boxed")):
        return s  # math spans handle themselves; "3.5" must not be split at its dot
    m = _SENTENCE_END_RE.search(s)
    return s[: m.start()] if m else s


# --------------------------------------------------------------------------------------------
# GSM8K: numbers
# --------------------------------------------------------------------------------------------


def _parse_number(token: str) -> float | None:
    """A number token ("1,000", "-3", "18.50", "3/4") as a float, or None."""
    token = token.replace(",", "")
    try:
        if "/" in token:
            num, den = token.split("/", 1)
            if float(den) == 0:
                return None
            exact = Fraction(num) / Fraction(den)
            try:
                return float(exact)
            except OverflowError:  # past a float's range: compared exactly (_exact_number)
                return math.inf if exact > 0 else -math.inf
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def _number_in(span: str) -> str | None:
    """The number a short answer span states, as written minus thousands separators.

    Rules, in order: after the last ``=`` if there is one ("5 + 13 = 18"); ignoring parenthesised
    asides ("18 (9 eggs x $2)"); then the last number, which is what a sentence like "In 2 weeks
    she earns 36" ends on.
    """
    span = span.replace("\u2212", "-").replace("\\!", "").replace("{,}", ",")
    span = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"\1/\2", span)
    span = re.sub(r"\^\{?\d+\}?|[\u00b2\u00b3]", "", span)  # "5 m^2": the 2 is a unit power
    if "=" in span:
        tail = span.rsplit("=", 1)[1]
        if _NUMBER_RE.search(tail):
            span = tail
    no_aside = re.sub(r"\([^()]*\)", " ", span)
    for candidate in (no_aside, span):
        tokens = _NUMBER_RE.findall(candidate)
        if tokens:
            token = tokens[-1]
            if _parse_number(token) is not None:
                return token.replace(",", "")
    return None


def _exact_number(token: str) -> Fraction:
    """A number token past a float's range (a model writing "1" 400 times) as an exact value:
    as a float it is infinity, and every such answer would equal every other one (found by
    tests/test_fuzz.py; `round(inf)` also crashed majority voting)."""
    return Fraction(token.replace(",", ""))


def _format_number(value: float) -> str:
    """Canonical key for a number: integers without ".0", others trimmed to 6 decimals."""
    if abs(value - round(value)) < _NUMBER_ABS_TOL:
        return str(int(round(value)))
    return f"{value:.6f}".rstrip("0").rstrip(".")


# --------------------------------------------------------------------------------------------
# CSQA: option letters
# --------------------------------------------------------------------------------------------


def _letters(options: Options) -> str:
    """Valid option letters: as many as there are options, A-E when options are unknown."""
    if options:
        return string.ascii_uppercase[: len(options)]
    return "ABCDE"


def _norm_text(s: str) -> str:
    """Option-text comparison key: case-folded, punctuation-free, whitespace-collapsed."""
    s = s.casefold()
    s = re.sub(r"[^\w\s]", " ", s)
    return " ".join(s.split())


def _csqa_letter(candidate: str, options: Options) -> str | None:
    """Map a stated answer to an option letter, or None.

    Exact option text wins over a letter reading ("A bank" could be letter A or the text
    "a bank"); then a lone letter, a letter with a delimiter ("B) library"), and finally the
    option text contained in the answer or the answer contained in one option text, each only
    when unambiguous.
    """
    letters = _letters(options)
    c = _clean_candidate(candidate)
    c = re.sub(r"^\\text\{(.*)\}$", r"\1", c).strip()
    if not c:
        return None
    texts = [(letter.strip().upper(), _norm_text(text)) for letter, text in options or ()]
    nc = _norm_text(c)
    for letter, text in texts:
        if text and nc == text:
            return letter
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", c)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = re.match(r"^\(?([A-Z])\s*[).:\-\u2013]", c)  # "B) library", "(B) library", "B. library"
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.match(r"^([A-Z])\s+(\S.*)$", c)  # "B library", but not "A person would ..."
    if m and m.group(1) in letters:
        own = dict(texts).get(m.group(1))
        if own and own in _norm_text(m.group(2)):
            return m.group(1)
    m = re.match(r"^(?:option|choice)\s*\(?([A-Za-z])\)?(?![A-Za-z])", c, re.IGNORECASE)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    if texts and nc:
        inside = [
            (letter, text)
            for letter, text in texts
            if text and re.search(rf"(?<!\w){re.escape(text)}(?!\w)", nc)
        ]
        if len(inside) == 1:
            return inside[0][0]
        if inside:
            longest = max(inside, key=lambda lt: len(lt[1]))
            if all(t in longest[1] for _, t in inside):
                return longest[0]
        if len(nc) >= 3:
            around = [
                letter
                for letter, text in texts
                if re.search(rf"(?<!\w){re.escape(nc)}(?!\w)", text)
            ]
            if len(around) == 1:
                return around[0]
    return None


# --------------------------------------------------------------------------------------------
# MATH: string normalisation and math_verify
# --------------------------------------------------------------------------------------------

_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_WORDS_RE = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")


def _math_key(answer: str) -> str:
    """Best-effort canonical LaTeX string; equal keys imply equal answers, not the converse."""
    s = _clean_candidate(answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\b|\\right\b", "", s)
    s = re.sub(r"\\[!,;:> ]|~", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("{,}", ",")
    s = re.sub(r"\\(?:displaystyle)\b", "", s)
    prev = None
    while prev != s:
        prev = s
        s = _TEXT_CMD_RE.sub(r"\1", s)
    # "Monday", "odd", "\text{Devon}": plain words compare case-insensitively.
    words = " ".join(s.split())
    if _WORDS_RE.fullmatch(words) and any(len(w) >= 3 for w in words.split()):
        return words.casefold()
    s = "".join(s.split())
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"^[A-Za-z]=(?!.*=)", "", s)  # "x=5" -> "5" (math_verify agrees)
    s = s.rstrip(_TRAILING_PUNCT)
    number = _exact_fraction(s)
    if number is not None:
        if number.denominator == 1:
            return str(number.numerator)
        sign = "-" if number < 0 else ""
        return f"{sign}\\frac{{{abs(number.numerator)}}}{{{number.denominator}}}"
    return s


def _exact_fraction(s: str) -> Fraction | None:
    """A purely numeric key ("0.5", "\\frac{1}{2}", "-3/4", "1,000") as an exact Fraction."""
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s) or re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        if int(m.group(3)) == 0:
            return None
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) else value
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+", s):
        return Fraction(s.replace(",", ""))
    return None


def _timeouts_usable() -> bool:
    """math_verify times out with SIGALRM, which Python only allows in the main thread."""
    return os.name == "posix" and threading.current_thread() is threading.main_thread()


class _DropTimeoutDisabledWarning(logging.Filter):
    """Hide math_verify's one-time "Timeout is disabled" warning: disabling it off the main
    thread is a deliberate choice here, and the warning would land in the user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


@lru_cache(maxsize=4096)
def _mv_parse(answer: str, with_timeout: bool) -> tuple[Any, ...]:
    """math_verify's parse of one extracted answer, cached: majority voting compares each answer
    with many others, and parsing dominates the cost."""
    from math_verify import parse

    timeout = _PARSE_TIMEOUT_S if with_timeout else None
    try:
        parsed = parse(f"${answer}$", parsing_timeout=timeout)  # type: ignore[arg-type]
        if not parsed:
            parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)  # type: ignore[arg-type]
    except BaseException as exc:  # its TimeoutException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return ()
    return tuple(parsed)


def _mv_equal(a: str, b: str) -> bool:
    """Symbolic/numeric equality via math_verify, in both directions, never raising.

    ``verify`` is asymmetric (gold first); trying both orders makes answers_equal symmetric,
    which majority voting needs.
    """
    if len(a) > _MATH_VERIFY_MAX_CHARS or len(b) > _MATH_VERIFY_MAX_CHARS:
        return False
    try:
        from math_verify import verify
    except ImportError:  # the string fast path still grades; a missing extra must not crash
        return False
    with_timeout = _timeouts_usable()
    timeout = _VERIFY_TIMEOUT_S if with_timeout else None
    pa, pb = _mv_parse(a, with_timeout), _mv_parse(b, with_timeout)
    if not pa or not pb:
        return False
    try:
        return bool(
            verify(list(pa), list(pb), timeout_seconds=timeout)  # type: ignore[arg-type]
            or verify(list(pb), list(pa), timeout_seconds=timeout)  # type: ignore[arg-type]
        )
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return False


# --------------------------------------------------------------------------------------------
# Exact
# --------------------------------------------------------------------------------------------


def _exact_key(answer: str) -> str:
    """Case-insensitive, whitespace-collapsed, trailing-punctuation-free comparison key."""
    s = _strip_markdown(answer.strip())
    s = " ".join(s.split()).casefold()
    s = s.rstrip(_TRAILING_PUNCT + " ")
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _from_candidate(candidate: str, task: str, options: Options) -> str | None:
    """The task's answer from one candidate span, or None when the span states none.

    The first sentence is tried before the whole span, so prose after the answer ("18. I hope
    it is correct.") cannot contribute a number or a word.
    """
    first = _first_sentence(candidate.strip())
    spans = (first, candidate) if first.strip() != candidate.strip() else (candidate,)
    for span in spans:
        if task == "gsm8k":
            answer = _number_in(_clean_candidate(span))
        elif task == "csqa":
            answer = _csqa_letter(span, options)
        else:
            cleaned = _clean_candidate(span)
            answer = cleaned if cleaned.strip(string.punctuation + " ") else None
        if answer is not None:
            return answer
    return None


def extract_answer(text: str, task: str, options: Options = None) -> str | None:
    """The final answer a model output states, or None when it states none.

    The last ``Final Answer`` line that yields a valid answer for the task wins (so "Final
    Answer: Final Answer: 125" and a corrected answer after a first one both work); without
    one, task conventions: MATH ``\\boxed{}`` then "the answer is X"; GSM8K ``#### N``, "the
    answer is N", then the last number; CSQA "answer is (B)" then a lone letter on the last
    line; exact the last non-empty line. GSM8K answers come back as the number written without
    thousands separators ("1000", "18.50"), CSQA answers as the option letter.
    """
    _check_task(task)
    task = _RULES_OF.get(task, task)
    if not text or not text.strip():
        return None
    markers = [m.end() for m in _FINAL_INLINE_RE.finditer(text)]
    markers += [m.end() for m in _FINAL_HEADING_RE.finditer(text)]
    for end in sorted(markers, reverse=True):
        answer = _from_candidate(_text_after(text, end), task, options)
        if answer is not None:
            return answer

    if task == "math":
        boxed = last_boxed(text)
        if boxed is not None and boxed.strip():
            return _from_candidate(boxed, task, options)
    if task == "gsm8k":
        for m in reversed(list(_GSM8K_HASHES_RE.finditer(text))):
            answer = _number_in(m.group(1))
            if answer is not None:
                return answer
    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        answer = _from_candidate(_first_sentence(text[m.end() :]), task, options)
        if answer is not None:
            return answer

    lines = [line for line in text.splitlines() if line.strip()]
    if task == "gsm8k":
        return _number_in(text)
    if task == "csqa":
        for line in reversed(lines[-2:]):
            c = _clean_candidate(line)
            if re.fullmatch(r"\(?[A-Z]\)?[.:)]?", c):
                return _csqa_letter(c, options)
        return None
    if task == "exact":
        return _from_candidate(lines[-1], task, options) if lines else None
    return None


def normalize_answer(answer: str | None, task: str, options: Options = None) -> str | None:
    """A canonical key: answers the grader calls equal map to the same key where feasible.

    Used to group answers for majority voting. GSM8K: the number ("18.00" and "$18" -> "18");
    CSQA: the option letter; exact: the case-folded, collapsed string; MATH: a best-effort
    LaTeX string (``$``, ``\\boxed``, spaces, ``\\left``/``\\right`` gone, ``\\dfrac`` ->
    ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``, pure numbers as exact fractions so "0.5",
    "1/2" and ``\\frac12`` share a key). MATH equality still goes through answers_equal, which
    also knows symbolic equivalences no string key can.
    """
    _check_task(task)
    task = _RULES_OF.get(task, task)
    if answer is None or not answer.strip():
        return None
    if task == "gsm8k":
        token = _number_in(_clean_candidate(answer))
        value = _parse_number(token) if token is not None else None
        if value is not None and not math.isfinite(value):
            return str(_exact_number(token))  # type: ignore[arg-type]
        return None if value is None else _format_number(value)
    if task == "csqa":
        return _csqa_letter(answer, options)
    if task == "exact":
        return _exact_key(answer) or None
    return _math_key(answer) or None


def answers_equal(a: str | None, b: str | None, task: str, options: Options = None) -> bool:
    """Whether two extracted answers are the same answer for this task (None never equals)."""
    _check_task(task)
    task = _RULES_OF.get(task, task)
    if a is None or b is None:
        return False
    if task == "gsm8k":
        ta, tb = _number_in(_clean_candidate(a)), _number_in(_clean_candidate(b))
        va = _parse_number(ta) if ta is not None else None
        vb = _parse_number(tb) if tb is not None else None
        if va is None or vb is None:
            return False
        if not (math.isfinite(va) and math.isfinite(vb)):
            return _exact_number(ta) == _exact_number(tb)  # type: ignore[arg-type]
        return math.isclose(va, vb, rel_tol=1e-9, abs_tol=_NUMBER_ABS_TOL)
    ka, kb = normalize_answer(a, task, options), normalize_answer(b, task, options)
    if ka is None or kb is None:
        return False
    if ka == kb:
        return True
    if task != "math":
        return False
    # math_verify reads "odd" as the product d*d*o: words are words, compared by key above.
    is_word = _WORDS_RE.fullmatch(ka) or _WORDS_RE.fullmatch(kb)
    if is_word and any(len(w) >= 3 for w in (ka + " " + kb).split()):
        return False
    return _mv_equal(_clean_candidate(a), _clean_candidate(b))


def grade(
    text: str, ground_truth: str, task: str, options: Options = None
) -> tuple[str | None, int]:
    """(extracted answer, reward 1 or 0) for one model output against the ground truth.

    Never raises for a malformed output or a grader failure: a leaf that cannot be graded is
    simply not correct, and one bad leaf must not stop a run of thousands.
    """
    _check_task(task)
    try:
        extracted = extract_answer(text, task, options)
    except Exception:
        return None, 0
    try:
        return extracted, int(answers_equal(extracted, ground_truth, task, options))
    except Exception:
        return extracted, 0
