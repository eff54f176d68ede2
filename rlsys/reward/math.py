"""Exact math reward: the last boxed answer of a response against one or more references.

``compute_score`` runs in the calling process with no time or memory limit. Text written by a
model is hostile (exponent towers, giant strings, inputs that make sympy hang), so anything that
scores untrusted responses must go through ``rlsys.reward.pool.RewardPool``, which runs this
function in killable worker processes.

Choices and simplifications, in pipeline order:

* Extraction: the answer is the content of the LAST ``\\boxed{...}`` or ``\\fbox{...}`` whose braces
  balance (``\\{`` and ``\\}`` do not count as grouping); an unbalanced last box falls back to the
  one before it. ``\\boxed 5`` takes the next token. A response with no box scores wrong: there is
  no fallback to "the last number", because rewarding unboxed text would teach the policy to skip
  the box. References may be raw or boxed; a GSM8K ``####`` mark is dropped; numeric references
  (``int``/``float`` from JSON) are read as their ``str``.
* Cheap caps before any parsing: responses over ``MAX_RESPONSE_CHARS`` and boxed answers over
  ``MAX_ANSWER_CHARS`` score wrong, and a size bound on the parsed (still unevaluated) tree refuses
  numbers that could have more than ``MAX_RESULT_DIGITS`` digits (``9^{9^{9^{9}}}``,
  ``(10^{10})!``), roots, logs and trig functions of numbers over ``MAX_FUNCTION_ARGUMENT_DIGITS``
  digits, and powers of sums above ``MAX_SYMBOLIC_POWER`` before sympy evaluates them. Below these
  bounds arithmetic is exact, so an intermediate power that cancels (``\\frac{2^{100000}}{2^{99998}}``)
  is evaluated, not given up. Identical texts are equal before any parsing, so a refused answer
  still equals itself. No step evaluates answer text as Python: the LaTeX goes only to the ANTLR
  parser of latex2sympy2_extended, never to ``sympify``/``parse_expr``.
* Normalisation (ours, on the LaTeX string): control characters removed, unicode symbols
  (``−``, ``π``, ``√``, ``∞``, ``≤``...) to LaTeX, spacing and sizing macros dropped,
  ``\\dfrac``/``\\tfrac`` to ``\\frac``, ``\\frac12``/``\\sqrt2`` braced, ``$``, degrees, currency and
  trailing unit words or ``\\text{...}`` dropped (``\\text{5 meters}`` is ``5`` with a unit too),
  a whole answer spelled in words below 100 read as its number (``\\text{twenty-one}``, ``five
  meters``; not ``one or two``), ``million``/``dozen``... turned into factors, ``\\langle a, b\\rangle``
  read as ``(a, b)``, unbraced subscripts braced (``\\log_2 8`` is ``\\log_{2} 8``),
  thousands separators (``1,000``, ``1{,}000``, ``1\\,000``) removed only when the whole answer is
  such a number and every group after the first has three digits (so ``1,2`` and ``1, 000`` stay
  lists), scientific ``3e5`` read as ``3 \\times 10^{5}``. Digits separated only by a space
  (``2 3``) do not parse: that is a list or a typo, never the product 6.
* Percent: a trailing ``%`` is removed and that side's number is read both as written and divided
  by 100, so ``50\\%`` equals ``50`` (GSM8K references drop the sign) and ``0.5`` (the quantity).
  Without a sign on either side nothing is divided: ``0.5`` does not equal ``50``. The price of
  the double reading is that ``0.25\\%`` equals a reference ``0.25``.
* Readings: each side becomes a few typed readings and two answers are equal when any reading of
  one equals a reading of the other of a compatible kind: expression, text, choice letter, tuple
  (ordered), set and bare list (unordered, and a set may equal a bare list), interval (endpoints
  AND open/closed ends), union of intervals, matrix, equation. ``(1, 2)`` reads as both an ordered
  pair and an open interval, so it never equals ``[1, 2)``, ``\\{1, 2\\}`` or ``(2, 1)``. A bare list
  ``2, 3`` is a list of solutions and equals ``3, 2`` (so a reference that is an ordered pair
  written without parentheses loses its order); ``a \\pm b`` is the list ``a+b, a-b``;
  ``a = 1, b = 2`` is also the tuple ``(1, 2)``. ``x \\le 3`` reads as ``(-\\infty, 3]`` and
  ``\\mathbb{R}`` as ``(-\\infty, \\infty)``. Subsets of the reals written with ``\\cup``,
  ``\\setminus`` or inequalities joined by "or" are merged into disjoint intervals when their
  endpoints are numbers, so ``\\mathbb{R}\\setminus[1,3]``, ``x<1 \\text{ or } x>3`` and
  ``(-\\infty,1)\\cup(3,\\infty)`` are equal ("and" is not read as a union). A vector (a matrix of
  one row or one column) equals the tuple of its entries, but a row never equals a column.
* Equations: ``x = 3``, ``f(x) = 3``, ``(x, y) = (1, 2)`` read as their right side, and a chain
  ``x = 2 + 3 = 5`` as its last side. Two such answers naming different things are unequal
  (``y = 3`` does not answer ``x = 3``, while ``3`` and ``x = 3`` are equal either way). A response
  whose right side has no letters also reads as it (``a + b = 7`` answers 7), but a reference
  with a non-trivial left side stays an equation (``x^2 + y^2 = 25`` is not answered by ``25``).
  Two equations are equal when one side-difference is a nonzero constant multiple of the other.
* Equality is exact: rationals compare as rationals, decimals are rewritten to the exact fraction
  of their written digits before parsing (``0.333333`` is 333333/1000000, never 1/3; ``0.\\overline{3}``
  is 1/3), and other expressions are equal only when sympy reduces their difference to 0
  (expand, radsimp, cancel, simplify, sqrtdenest; for constants also splitting logarithms over
  prime factors and rewriting ``e^{i\\theta}`` and ``\\cos\\theta + i\\sin\\theta`` as ``a + bi``, so
  change of base and polar forms compare). A 40-digit numeric evaluation, at a few seeded
  random points when there are symbols, is used only to REJECT quickly, never to accept; a
  difference that is numerically 0 but that sympy cannot reduce is judged unequal.
* Degrees are dropped, not converted: ``30^\\circ`` equals ``30`` but not ``\\frac{\\pi}{6}``; only
  in an answer with a trig function are they converted (``\\sin 30^\\circ`` is 1/2). A reference
  that is a single letter A-E, alone or in parentheses, is a multiple-choice answer and only the
  response's leading letter counts.
* Symbols are case sensitive (``2A`` is not ``2a``); plain words compare case-insensitively.
  ``i`` is the imaginary unit.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import sympy
from latex2sympy2_extended import latex2sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig

MAX_RESPONSE_CHARS = 200_000
"""Longer responses score wrong without being read: a degenerate generation, not an answer."""
MAX_ANSWER_CHARS = 1_000
"""Longer boxed contents score wrong: no real answer is that long, and parsing cost grows with it."""
MAX_RESULT_DIGITS = 100_000
"""Parsed numbers whose decimal size could exceed this are refused before sympy evaluates them.

Below it evaluation is exact integer arithmetic, so ``\\frac{2^{100000}}{2^{99998}}`` is 4; one
operation on numbers of this size costs well under a second."""
MAX_FUNCTION_ARGUMENT_DIGITS = 1_000
"""Roots, trig, logs and other functions of numbers larger than this are refused: sympy factors
them or evaluates them to their full precision, which is not bounded by the digit count."""
MAX_SYMBOLIC_POWER = 64
"""Integer powers of non-numeric bases above this are refused: expanding them is unbounded work."""
MAX_NESTING_DEPTH = 10
"""Expressions nested deeper (brackets of any kind) are not parsed: the parser's time grows
faster than linearly with depth (``x_{x_{...}}`` 15 deep takes seconds), and real answers stay
within a few levels. Redundant brackets around a whole answer are peeled off before this."""
MAX_LIST_ITEMS = 64
"""Tuples, sets and lists with more items are compared as text only."""

_PARSER_CONFIG = ConversionConfig(interpret_as_mixed_fractions=True, lowercase_symbols=False)
_IMAGINARY_UNIT = sympy.Symbol("i")


def compute_score(
    response: str,
    reference: str | list[str],
    *,
    correct_score: float = 5.0,
    wrong_score: float = -5.0,
) -> float:
    """``correct_score`` if the last boxed answer of ``response`` equals any reference, else ``wrong_score``.

    In-process and unguarded: untrusted responses must be scored through ``RewardPool``.
    """
    return correct_score if is_correct(response, reference) else wrong_score


def is_correct(response: str, reference: str | list[str]) -> bool:
    """Whether the last boxed answer of ``response`` is mathematically equal to any reference."""
    return check_response(response, reference)[0]


def check_response(response: str, reference: str | list[str]) -> tuple[bool, str | None]:
    """(correct, extracted answer). An error inside the checker counts as not equal; a MemoryError
    propagates so that the sandbox can count it as a crash."""
    answer = extract_boxed_answer(response)
    if answer is None:
        return False, None
    references = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    for candidate in references:
        if isinstance(candidate, (int, float)) and not isinstance(candidate, bool):
            candidate = str(candidate)
        if not isinstance(candidate, str):
            continue
        try:
            if answers_equal(answer, reference_answer(candidate)):
                return True, answer
        except MemoryError:
            raise
        except Exception:
            continue
    return False, answer


def reference_answer(reference: str) -> str:
    """A reference as an answer string: its last box when it has one, without a GSM8K ``####`` mark."""
    boxed = extract_boxed_answer(reference) if ("\\boxed" in reference or "\\fbox" in reference) else None
    text = boxed if boxed is not None else reference
    return text.strip().removeprefix("####").strip()


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BOX_TOKEN = re.compile(r"[^\s$]+")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


def extract_boxed_answer(text: str) -> str | None:
    """Content of the last balanced ``\\boxed``/``\\fbox``, or None (no box, unbalanced, too long).

    Linear in the length of ``text`` whatever its shape: the braces are matched in one pass, so
    thousands of unclosed boxes cost no more than one.
    """
    if not isinstance(text, str) or len(text) > MAX_RESPONSE_CHARS:
        return None
    starts = [match.end() for match in _BOX_COMMAND.finditer(text)]
    if not starts:
        return None
    closing = _matching_braces(text)
    for start in reversed(starts):
        content = _box_content(text, start, closing)
        if content is not None:
            content = content.strip()
            if content and len(content) <= MAX_ANSWER_CHARS:
                return content
            return None
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each ``{`` that closes -> index of its ``}``; ``\\{`` and ``\\}`` do not count."""
    closing: dict[int, int] = {}
    open_braces: list[int] = []
    for match in _BRACE_OR_ESCAPE.finditer(text):
        char = match.group(0)
        if char == "{":
            open_braces.append(match.start())
        elif char == "}" and open_braces:
            closing[open_braces.pop()] = match.start()
    return closing


def _box_content(text: str, start: int, closing: dict[int, int]) -> str | None:
    """The argument of a box command whose name ends at ``start``; None when braces never close."""
    position = start
    while position < len(text) and text[position] in " \t":
        position += 1
    if position >= len(text):
        return None
    if text[position] != "{":
        token = _BOX_TOKEN.match(text, position)
        return token.group(0) if token else None
    end = closing.get(position)
    return text[position + 1 : end] if end is not None else None


# --------------------------------------------------------------------------------------------
# Normalisation of an answer string
# --------------------------------------------------------------------------------------------

_UNICODE_TO_LATEX = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u221a": "\\sqrt", "\u2264": "\\le ",
    "\u2265": "\\ge ", "\u2260": "\\ne ", "\u222a": "\\cup ", "\u2229": "\\cap ", "\u00b0": "^\\circ",
    "\u00bd": "\\frac{1}{2}", "\u00bc": "\\frac{1}{4}", "\u00be": "\\frac{3}{4}", "\u00a0": " ",
    "\u2009": " ", "\u202f": " ", "\u2061": "", "\u200b": "", "\ufeff": "",
}
_UNICODE_PATTERN = re.compile("|".join(re.escape(key) for key in _UNICODE_TO_LATEX))
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SIZING = re.compile(r"\\(?:left|right|middle|[bB]igg?[lr]?)(?![A-Za-z])\s*")
_SPACING = re.compile(r"(?<!\\)\\(?:[,;:!> ]|quad|qquad|thinspace|medspace|thickspace|enspace|hspace\{[^{}]*\}|displaystyle|textstyle)")
_TEXT_WRAPPERS = re.compile(r"\\(?:textbf|textit|textrm|textnormal|textup|textsf|texttt|mathrm|mathbf|mathit|mathsf|mathtt|mathnormal|mbox|hbox|operatorname\*?)(?![A-Za-z])")
_FRACTION_VARIANTS = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_UNBRACED_FRACTION = re.compile(r"\\frac\s*(\d|\{[^{}]*\}|\\[A-Za-z]+)\s*(\d|\{[^{}]*\}|[A-Za-z]|\\[A-Za-z]+)")
_UNBRACED_SUBSCRIPT = re.compile(r"_\s*(\d+(?=\s)|[0-9A-Za-z])")
"""``\\log_2 8`` is ``\\log_{2} 8``: an unbraced subscript is one character, or a number before a space."""
_CIS = re.compile(r"\\text\{\s*cis\s*\}")
"""``r \\operatorname{cis} \\theta`` is ``r e^{i\\theta}``; ``\\exp`` takes its argument as ``\\sin`` does."""
_UNBRACED_ROOT = re.compile(r"\\sqrt\s*(\[[^\[\]]*\])?\s*(\d+|[A-Za-z](?![A-Za-z]))")
_DEGREES = re.compile(r"\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ$|\\degree|\\text\{\s*degrees?\s*\}|\s+degrees?)\s*(?:[CF](?![A-Za-z]))?")
_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\\text\{\s*percent\s*\}|\s+percent)\s*$")
_DOLLARS = re.compile(r"\\\$|\\text\{\s*\\\$\s*\}|(?<!\\)\$")
_TRAILING_TEXT_UNIT = re.compile(r"\s*\\text\{[^{}]*\}\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$")
_TRAILING_UNIT_WORD = re.compile(
    r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?)\s*"
    r"(?:(?:square|sq\.?|cubic)\s+)?"
    r"(?:units?|cm|mm|km|m|meters?|metres?|in|inches|inch|ft|feet|foot|yd|yards?|miles?|mi|kg|g|grams?|mg|"
    r"lbs?|pounds?|oz|ounces?|s|sec|seconds?|min|minutes?|h|hrs?|hours?|days?|weeks?|months?|years?|"
    r"mph|km/h|m/s|dollars?|cents?|L|mL|liters?|litres?|gallons?|degrees?|people|students|ways)"
    r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*$"
)
_SCALE_FACTORS = {
    "hundred": "100", "thousand": "1000", "million": "10^{6}", "billion": "10^{9}", "trillion": "10^{12}", "dozen": "12",
}
_SCALE_WORD = re.compile(r"\s*(?:\\text\{\s*)?\b(hundred|thousand|million|billion|trillion|dozen)s?\b(?:\s*\})?", re.IGNORECASE)
_THOUSANDS_COMMA = re.compile(r"^([+-]?\d{1,3}(?:,\d{3})+)(\.\d+)?$")
_THOUSANDS_BRACED = re.compile(r"(?<=\d)\{,\}(?=\d{3}(?!\d))")
_THOUSANDS_SPACE = re.compile(r"^([+-]?\d{1,3}(?: \d{3})+)(\.\d+)?$")
_SCIENTIFIC = re.compile(r"(?<![\w\\.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_CHOICE = re.compile(r"^\(?([A-E])\)?(?:\s|$|[.:])")
_WORD_ONLY = re.compile(r"^[A-Za-z][A-Za-z '\-]*$")
_INFINITY_WORDS = re.compile(r"(?<![A-Za-z\\])(?:infinity|inf)(?![A-Za-z])")
_IMAGINARY_MARKUP = re.compile(r"\\(?:text|imath|mathit)\{\s*i\s*\}|\\imath(?![A-Za-z])")
_LIST_WORDS = re.compile(r"\\text\{\s*,?\s*(?:and|or)\s*\}|(?<![A-Za-z\\]),?\s*\b(?:and|or)\b\s*(?![A-Za-z])")
_RELATION_WORDS = {
    "\\leq": "\\le", "\\leqslant": "\\le", "\\geq": "\\ge", "\\geqslant": "\\ge", "\\lt": "<", "\\gt": ">",
    "\\neq": "\\ne", "\\dots": "\\ldots", "\\cdots": "\\ldots", "\\langle": "(", "\\rangle": ")",
    "\\backslash": "\\setminus", "\\smallsetminus": "\\setminus",
}
_RELATION_PATTERN = re.compile("|".join(re.escape(key) + r"(?![A-Za-z])" for key in _RELATION_WORDS))
_TRIG_CALL = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)(?![A-Za-z])|\\text\{\s*cis\s*\}")
_DEGREE_ANGLE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\degree)")
_TEXT_NUMBER = re.compile(r"^\\text\{\s*([+-]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))(?:\s+([^{}]*?))?\s*\}$")
_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen".split()
    )
}
_TENS_WORDS = {
    word: 10 * (index + 2) for index, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())
}
_SPELLED_NUMBER = re.compile(
    rf"^(?:({'|'.join(_TENS_WORDS)})(?:[- ]({'|'.join(list(_NUMBER_WORDS)[1:10])}))?|({'|'.join(_NUMBER_WORDS)}))"
    r"(?:\s+([A-Za-z][A-Za-z \-]*))?$",
    re.IGNORECASE,
)
_NOT_A_UNIT = (
    set(_NUMBER_WORDS) | set(_TENS_WORDS)
    | {"and", "or", "to", "by", "point", "plus", "minus", "times", "over", "squared", "cubed"}
    | {"more", "less", "fewer", "than", "greater", "smaller", "larger"}
    | {"half", "halves", "third", "thirds", "quarter", "quarters"}
    | {ordinal + suffix for ordinal in ("fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "hundredth") for suffix in ("", "s")}
)
"""Words after a spelled number that make it something else than a number with a unit
(``two thirds``, ``five more than x``, ``one or two``)."""


@dataclass(frozen=True)
class CleanAnswer:
    """An answer string after normalisation, with the percent sign recorded separately."""

    text: str
    percent: bool


def clean_answer(raw: str) -> CleanAnswer:
    """Normalise an answer string (see the module docstring for every rule)."""
    text = _CONTROL_CHARS.sub("", raw)
    text = _UNICODE_PATTERN.sub(lambda match: _UNICODE_TO_LATEX[match.group(0)], text)
    text = text.replace("\n", " ").replace("\t", " ")
    text = _SPACING.sub(" ", text)
    text = text.replace("~", " ")
    text = _SIZING.sub("", text)
    text = _TEXT_WRAPPERS.sub(r"\\text", text)
    text = _FRACTION_VARIANTS.sub(r"\\frac", text)
    text = _RELATION_PATTERN.sub(lambda match: _RELATION_WORDS[match.group(0)], text)
    text = _IMAGINARY_MARKUP.sub("i", text)
    text = _INFINITY_WORDS.sub(r"\\infty", text)
    text = text.replace("+\\infty", "\\infty").replace("\\infin ", "\\infty ")
    text = _DOLLARS.sub("", text)
    text = _THOUSANDS_BRACED.sub("", text)
    text = _strip_outer_braces(text.strip())
    text = re.sub(r"^\\text\{\s*(?:the\s+)?(?:final\s+)?answer\s+is:?\s*\}", "", text, flags=re.IGNORECASE).strip()
    text = text.rstrip(" .;")
    text = re.sub(r"\\text\{\s*\.?\s*\}$", "", text).strip()
    text = _TEXT_NUMBER.sub(lambda match: match.group(1) + (f"\\text{{ {match.group(2)}}}" if match.group(2) else ""), text)
    text = _spelled_number(text)
    if _TRIG_CALL.search(text):
        # The argument of a trig function is an angle: there degrees are a unit to convert, not
        # decoration to drop (``\\sin 30^\\circ`` is 1/2).
        text = _DEGREE_ANGLE.sub(r"(\\frac{\1\\pi}{180})", text)
    text = _DEGREES.sub("", text).strip()
    percent = False
    stripped = _PERCENT.sub("", text)
    if stripped != text and stripped:
        percent, text = True, stripped.strip()
    # Words that scale the number become factors before units go, so ``5 \\text{ million}`` is
    # 5000000 and not 5.
    text = _SCALE_WORD.sub(lambda match: f"\\times {_SCALE_FACTORS[match.group(1).lower()]}", text)
    text = _strip_units(text)
    text = _strip_outer_braces(text)
    number = _THOUSANDS_COMMA.match(text) or _THOUSANDS_SPACE.match(text)
    if number:
        text = number.group(1).replace(",", "").replace(" ", "") + (number.group(2) or "")
    return CleanAnswer(text=re.sub(r"\s+", " ", text).strip(), percent=percent)


def _spelled_number(text: str) -> str:
    """``five``, ``\\text{twenty-one}`` -> digits; a trailing word stays as a ``\\text`` unit.

    Only a whole answer that is words is read, and only when the words after the number cannot
    be more of a number or a list (``one or two`` and ``five thousand two hundred`` stay text).
    """
    words = re.fullmatch(r"\\text\{([^{}]*)\}", text)
    words = (words.group(1) if words else text).strip()
    match = _SPELLED_NUMBER.match(words)
    if not match:
        return text
    tens, units, small, rest = match.groups()
    if rest and not _could_be_unit(rest):
        return text
    if tens:
        value = _TENS_WORDS[tens.lower()] + (_NUMBER_WORDS[units.lower()] if units else 0)
    else:
        value = _NUMBER_WORDS[small.lower()]
    return str(value) + (f"\\text{{ {rest}}}" if rest else "")


def _could_be_unit(words: str) -> bool:
    return not _NOT_A_UNIT & set(re.findall(r"[a-z]+", words.lower()))


def _strip_units(text: str) -> str:
    """Drop a trailing ``\\text{unit}`` or a unit word after a plain number."""
    for _ in range(2):
        unit = _TRAILING_TEXT_UNIT.search(text)
        if unit is None or not _could_be_unit(unit.group(0)):
            break
        shorter = text[: unit.start()].strip()
        if shorter and not shorter.endswith(("=", "\\", ",")):
            text = shorter
    unit_word = _TRAILING_UNIT_WORD.match(text)
    if unit_word:
        text = unit_word.group(1)
    return text


def _strip_outer_braces(text: str) -> str:
    """``{x}`` -> ``x`` while the outer braces enclose the whole string."""
    while len(text) >= 2 and text[0] == "{" and text[-1] == "}" and _closing_index(text, 0) == len(text) - 1:
        text = text[1:-1].strip()
    return text


def _closing_index(text: str, opening: int) -> int:
    """Index of the brace that closes the ``{`` at ``opening``, or -1.

    An iterative scan, so deeply nested braces cost time linear in their length and no recursion;
    escaped ``\\{`` and ``\\}`` are skipped.
    """
    depth = 0
    index = opening
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return -1


def canonical_text(text: str) -> str:
    """Whitespace-free form used for exact textual equality; plain words are lowercased."""
    unwrapped = re.sub(r"\\text\{([^{}]*)\}", r"\1", text).strip()
    if _WORD_ONLY.match(unwrapped) and len(unwrapped) > 1:
        return re.sub(r"\s+", " ", unwrapped).lower()
    return re.sub(r"\s+", "", text)


# --------------------------------------------------------------------------------------------
# Splitting at the top level of brackets
# --------------------------------------------------------------------------------------------

def split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` where no bracket of any kind is open; ``(1,2]`` counts as balanced."""
    parts: list[str] = []
    depth = 0
    current_start = 0
    index = 0
    while index < len(text):
        if text.startswith(("\\{", "\\}"), index):
            depth += 1 if text[index + 1] == "{" else -1
            index += 2
            continue
        if text[index] == "\\" and text.startswith("\\begin", index):
            depth += 1
        if text[index] == "\\" and text.startswith("\\end", index):
            depth -= 1
        char = text[index]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(separator, index):
            parts.append(text[current_start:index])
            index += len(separator)
            current_start = index
            continue
        index += 1
    parts.append(text[current_start:])
    return [part.strip() for part in parts]


def _enclosing_pair(text: str) -> tuple[str, str] | None:
    """The outer delimiters when a single bracket pair encloses the whole string, e.g. ``("(", "]")``."""
    if text.startswith("\\{") and text.endswith("\\}"):
        opener, closer, inner = "\\{", "\\}", text[2:-2]
    elif text[:1] in "([" and text[-1:] in ")]":
        opener, closer, inner = text[0], text[-1], text[1:-1]
    else:
        return None
    depth = 0
    index = 0
    while index < len(inner):
        if inner.startswith(("\\{", "\\}"), index):
            depth += 1 if inner[index + 1] == "{" else -1
            index += 2
            if depth < 0:
                return None
            continue
        char = inner[index]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if depth < 0:
            return None
        index += 1
    return (opener, closer) if depth == 0 else None


# --------------------------------------------------------------------------------------------
# Readings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One interpretation of an answer: ``kind`` decides which other readings it can equal."""

    kind: str
    value: Any
    name: str | None = None
    """What the answer names, from an equation's left side (``y`` in ``y = 3``)."""


@dataclass(frozen=True)
class Interval:
    left: sympy.Expr
    right: sympy.Expr
    left_closed: bool
    right_closed: bool


_SIMPLE_LHS = re.compile(
    r"^(?:[A-Za-z](?:_\{?\w+\}?)?'*|\\[A-Za-z]+(?:_\{?\w+\}?)?|[A-Za-z]+\([^()]*\)|\([A-Za-z,\s]+\)|"
    r"\\(?:angle|measuredangle)\s*[A-Z]+|[A-Z]{2,3}|\\overline\{[A-Z]+\})$"
)
_MEMBERSHIP = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*\\in\s*")
_MATRIX_ENV = re.compile(r"^\\begin\{([pbB]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}$", re.DOTALL)


def readings_of(cleaned: CleanAnswer, *, is_reference: bool) -> list[Reading]:
    """All readings of a normalised answer.

    ``is_reference`` matters for equations: ``a + b = 7`` as a response reads as ``7`` as well,
    but a reference ``x^2 + y^2 = 25`` stays an equation, so that a response ``25`` is wrong.
    """
    text = cleaned.text
    readings = [Reading("text", canonical_text(text))]
    choice = _CHOICE.match(_unwrap_text(text))
    if choice:
        readings.append(Reading("choice", choice.group(1)))
    readings.extend(_structured_readings(text, cleaned.percent, is_reference))
    return readings


def _unwrap_text(text: str) -> str:
    return re.sub(r"\\text\{([^{}]*)\}", r"\1", text).strip()


def _structured_readings(text: str, percent: bool, is_reference: bool) -> list[Reading]:
    text = _MEMBERSHIP.sub("", text)
    if text in _REALS:
        return [Reading("interval", Interval(-sympy.oo, sympy.oo, False, False))]
    if text in ("\\emptyset", "\\varnothing", "\\{\\}", "\\{ \\}"):
        return [Reading("set", ())]
    matrix = _MATRIX_ENV.match(text)
    if matrix:
        return _matrix_readings(matrix.group(2))
    if len(split_top_level(text, "\\cup")) > 1 or len(split_top_level(text, "\\setminus")) > 1:
        pieces = _real_set(text)
        return [] if pieces is None else [_real_set_reading(pieces)]
    alternatives = split_top_level(_OR_WORDS.sub("\x02", text), "\x02")
    if len(alternatives) > 1:
        inequalities = [_inequality_interval(alternative) for alternative in alternatives]
        if all(inequalities) and len({variable for variable, _ in inequalities}) == 1:
            return [_real_set_reading(_merged([interval for _, interval in inequalities]))]
    enclosing = _enclosing_pair(text)
    if enclosing is not None:
        return _bracketed_readings(text, *enclosing, percent=percent, is_reference=is_reference)
    items = _list_items(text)
    if len(items) >= 2:
        return _list_readings(items)
    equation_sides = split_top_level(text, "=")
    if len(equation_sides) >= 2:
        return _equation_readings(equation_sides, percent, is_reference)
    if "\\pm" in text or "\\mp" in text:
        plus = _expression(text.replace("\\pm", "+").replace("\\mp", "-"))
        minus = _expression(text.replace("\\pm", "-").replace("\\mp", "+"))
        return [Reading("list", (plus, minus))] if plus is not None and minus is not None else []
    inequality = _inequality_interval(text)
    if inequality is not None:
        return [Reading("interval", inequality[1])]
    value = _expression(text)
    if value is None:
        return []
    readings = [Reading("expression", value)]
    if percent:
        readings.append(Reading("expression", value / 100))
    return readings


def _bracketed_readings(text: str, opener: str, closer: str, *, percent: bool, is_reference: bool) -> list[Reading]:
    """``\\{...\\}`` is a set; ``(a, b)`` is a tuple and an open interval; ``[a, b)`` an interval."""
    items = split_top_level(text[len(opener) : -len(closer)], ",")
    if opener == "\\{":
        values = _element_values(items)
        return [Reading("set", values)] if values is not None else []
    if len(items) < 2:
        # ``(5)`` is 5; ``[5]`` and ``(5]`` are not answers.
        return _structured_readings(text[1:-1], percent, is_reference) if opener == "(" and closer == ")" else []
    readings = []
    interval = _interval(text)
    if interval is not None:
        readings.append(Reading("interval", interval))
    if opener == "(" and closer == ")":
        values = _element_values(items)
        if values is not None:
            readings.append(Reading("tuple", values))
    return readings


def _list_readings(items: list[str]) -> list[Reading]:
    """A bare list is unordered; ``a = 1, b = 2`` also reads as the ordered tuple ``(1, 2)``."""
    assigned = [_ASSIGNMENT.match(item) for item in items]
    values = _element_values(items)
    if values is None:
        return []
    readings = [Reading("list", values)]
    if all(assigned) and len({match.group(1) for match in assigned}) == len(items):
        readings.append(Reading("tuple", values))
    return readings


def _equation_readings(sides: list[str], percent: bool, is_reference: bool) -> list[Reading]:
    """``x = 3`` reads as ``3``; a response ``a + b = 7`` also reads as ``7``; ``x = \\frac{6}{3} = 2`` as ``2``.

    The left side is dropped when it names something (a variable, ``f(x)``, ``(x, y)``,
    ``\\angle ABC``), or, for a response only, when the right side has no letters. Two-sided
    equations also keep an equation reading.
    """
    if any(not side for side in sides) or any(side.endswith(("<", ">", "!", "\\le", "\\ge")) for side in sides[:-1]):
        return []
    readings = []
    if len(sides) == 2:
        left, right = _expression(sides[0]), _expression(sides[1])
        if left is not None and right is not None:
            readings.append(Reading("equation", left - right))
    right_has_letters = bool(re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", sides[-1])))
    if _SIMPLE_LHS.match(sides[0]):
        name = canonical_text(sides[0]).replace("{", "").replace("}", "")
        named = _structured_readings(sides[-1], percent, is_reference)
        readings.extend(dataclasses.replace(reading, name=name) for reading in named)
    elif not is_reference and not right_has_letters:
        readings.extend(_structured_readings(sides[-1], percent, is_reference))
    return readings


_ASSIGNMENT = re.compile(r"^\s*([A-Za-z](?:_\{?\w+\}?)?)\s*=(?!=)")


def _list_items(text: str) -> list[str]:
    """Items of a bare list: ``2, 3``, ``2 \\text{ and } 3``, ``x = 2 \\text{ or } x = 3``, ``1; 2``."""
    joined = _LIST_WORDS.sub(",", text)
    for separator in (",", ";"):
        items = split_top_level(joined, separator)
        if len(items) >= 2:
            return items
    return [text]


def _element_values(items: list[str]) -> tuple | None:
    """Parsed items of a tuple, set or list (``x = 2`` counts as ``2``); unparsed items stay as text.

    None when an item is empty or there are more than MAX_LIST_ITEMS.
    """
    if items == [""]:
        return ()
    if len(items) > MAX_LIST_ITEMS or any(not item for item in items):
        return None
    values = []
    for item in items:
        text = clean_answer(item).text
        sides = split_top_level(text, "=")
        if len(sides) == 2 and _SIMPLE_LHS.match(sides[0]):
            text = sides[1]
        value = _expression(text)
        values.append(canonical_text(text) if value is None else value)
    return tuple(values)


def _matrix_readings(body: str) -> list[Reading]:
    rows = [row for row in split_top_level(body.replace("\\\\", "\x01"), "\x01") if row.strip()]
    if not rows or len(rows) > MAX_LIST_ITEMS:
        return []
    matrix = []
    for row in rows:
        cells = split_top_level(row, "&")
        values = [_expression(clean_answer(cell).text) for cell in cells]
        if any(value is None for value in values):
            return []
        matrix.append(tuple(values))
    readings = [Reading("matrix", tuple(matrix))]
    if len(matrix) == 1 and len(matrix[0]) >= 2:
        readings.append(Reading("vector", matrix[0]))
    elif len(matrix) >= 2 and all(len(row) == 1 for row in matrix):
        readings.append(Reading("vector", tuple(row[0] for row in matrix)))
    return readings


def _interval(text: str) -> Interval | None:
    """``(a, b]`` style interval with parsed endpoints, or None."""
    text = text.strip()
    if text[:1] not in "([" or text[-1:] not in ")]" or _enclosing_pair(text) is None:
        return None
    items = split_top_level(text[1:-1], ",")
    if len(items) != 2:
        return None
    left, right = (_expression(clean_answer(item).text) for item in items)
    if left is None or right is None:
        return None
    return Interval(left, right, text[0] == "[", text[-1] == "]")


_INEQUALITY_SPLIT = re.compile(r"(\\le|\\ge|<=|>=|<|>)")
_SINGLE_VARIABLE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?$")


def _inequality_interval(text: str) -> tuple[str, Interval] | None:
    """``x \\le 3`` -> ``("x", (-oo, 3])``, ``-1 < x \\le 4`` -> ``("x", (-1, 4])``; anything else -> None."""
    pieces = [piece.strip() for piece in _INEQUALITY_SPLIT.split(text)]
    if len(pieces) not in (3, 5):
        return None
    operands, operators = pieces[0::2], pieces[1::2]
    strict = {"<": True, ">": True, "\\le": False, "<=": False, "\\ge": False, ">=": False}
    less = {"<": True, "\\le": True, "<=": True, ">": False, "\\ge": False, ">=": False}
    if len(operands) == 2:
        variable_left = bool(_SINGLE_VARIABLE.match(operands[0]))
        variable_right = bool(_SINGLE_VARIABLE.match(operands[1]))
        if variable_left == variable_right:
            return None
        bound = _expression(operands[1] if variable_left else operands[0])
        if bound is None:
            return None
        variable = operands[0] if variable_left else operands[1]
        upper = less[operators[0]] == variable_left
        closed = not strict[operators[0]]
        if upper:
            return variable, Interval(-sympy.oo, bound, False, closed)
        return variable, Interval(bound, sympy.oo, closed, False)
    if not _SINGLE_VARIABLE.match(operands[1]) or less[operators[0]] != less[operators[1]]:
        return None
    low, high = _expression(operands[0]), _expression(operands[2])
    if low is None or high is None:
        return None
    if less[operators[0]]:
        return operands[1], Interval(low, high, not strict[operators[0]], not strict[operators[1]])
    return operands[1], Interval(high, low, not strict[operators[1]], not strict[operators[0]])


_OR_WORDS = re.compile(r"\\text\{\s*or\s*\}|(?<![A-Za-z\\])or(?![A-Za-z])|\\(?:lor|vee)(?![A-Za-z])")
_REALS = ("\\mathbb{R}", "\\mathbb R", "\\R")


def _real_set(text: str) -> tuple[Interval, ...] | None:
    """A subset of the reals written with ``\\cup`` and ``\\setminus`` as merged intervals, or None.

    Pieces are intervals, ``\\mathbb{R}`` or inequalities; what is removed may also be a finite set
    (``\\mathbb{R} \\setminus \\{0\\}``). ``\\mathbb{R}\\setminus[1,3]`` is ``(-oo, 1) \\cup (3, oo)``.
    """
    difference = split_top_level(text, "\\setminus")
    if len(difference) == 2:
        kept, removed = _real_set(difference[0]), _real_set(difference[1])
        if removed is None:
            removed = _finite_real_set(difference[1])
        if kept is None or removed is None:
            return None
        return _set_operation(sympy.Complement, kept, removed)
    if len(difference) > 2:
        return None
    pieces = []
    for part in split_top_level(text, "\\cup"):
        part = _MEMBERSHIP.sub("", part)
        if part in _REALS:
            pieces.append(Interval(-sympy.oo, sympy.oo, False, False))
            continue
        interval = _interval(part)
        if interval is None:
            inequality = _inequality_interval(part)
            interval = inequality[1] if inequality else None
        if interval is None:
            return None
        pieces.append(interval)
    return _merged(pieces)


def _finite_real_set(text: str) -> tuple[Interval, ...] | None:
    """``\\{1, 2\\}`` as the degenerate intervals ``[1, 1], [2, 2]``, or None."""
    if _enclosing_pair(text) != ("\\{", "\\}"):
        return None
    values = _element_values(split_top_level(text[2:-2], ","))
    if not values or any(isinstance(value, str) or not _is_real_number(value) for value in values):
        return None
    return tuple(Interval(value, value, True, True) for value in values)


def _is_real_number(value: sympy.Expr) -> bool:
    return bool(value.is_number and value.is_extended_real)


def _as_sympy_set(pieces: tuple[Interval, ...]) -> sympy.Set | None:
    """The union of ``pieces`` in sympy when every endpoint is a real number, else None."""
    sets = []
    for piece in pieces:
        if not (_is_real_number(piece.left) and _is_real_number(piece.right)):
            return None
        if (piece.left_closed and piece.left.is_infinite) or (piece.right_closed and piece.right.is_infinite):
            return None  # ``[-\\infty, 1]`` is malformed; sympy would silently open it.
        if piece.left == piece.right and piece.left_closed and piece.right_closed:
            sets.append(sympy.FiniteSet(piece.left))
        elif (piece.left < piece.right) is sympy.true:
            sets.append(sympy.Interval(piece.left, piece.right, not piece.left_closed, not piece.right_closed))
        else:
            return None
    return sympy.Union(*sets)


def _as_intervals(real_set: sympy.Set) -> tuple[Interval, ...] | None:
    """A sympy union of proper intervals as our intervals; None for anything else (isolated points)."""
    parts = real_set.args if isinstance(real_set, sympy.Union) else (real_set,)
    if real_set is sympy.S.EmptySet:
        return ()
    if not all(isinstance(part, sympy.Interval) for part in parts):
        return None
    return tuple(Interval(part.start, part.end, not part.left_open, not part.right_open) for part in parts)


def _merged(pieces: list[Interval]) -> tuple[Interval, ...]:
    """Overlapping and touching intervals merged (``(1, 3) \\cup [3, 5]`` is ``(1, 5]``).

    Pieces with symbolic endpoints, and reversed or empty ones, stay as written: merging them
    would need an order sympy cannot decide, or would hide that the answer is malformed.
    """
    real_set = _as_sympy_set(tuple(pieces))
    merged = _as_intervals(real_set) if real_set is not None else None
    return merged if merged is not None else tuple(pieces)


def _set_operation(operation, first: tuple[Interval, ...], second: tuple[Interval, ...]) -> tuple[Interval, ...] | None:
    first_set, second_set = _as_sympy_set(first), _as_sympy_set(second)
    if first_set is None or second_set is None:
        return None
    return _as_intervals(operation(first_set, second_set))


def _real_set_reading(pieces: tuple[Interval, ...]) -> Reading:
    """One interval reads as an interval, none as the empty set, more as a union."""
    if len(pieces) == 1:
        return Reading("interval", pieces[0])
    if not pieces:
        return Reading("set", ())
    return Reading("union", pieces)


# --------------------------------------------------------------------------------------------
# Parsing one expression
# --------------------------------------------------------------------------------------------

_SPACED_DIGITS = re.compile(r"\d\s+\d")
"""``2 3`` would parse as 6; digits separated by a space are a list or a typo, never a product."""
_DECIMAL = re.compile(r"(?<![\d.])(\d*)\.(\d+)(?:\\overline\{(\d+)\}|\\dot\{(\d)\})?(?![\d.])")
_REPEATING_ONLY = re.compile(r"(?<![\d.])(\d*)\.\\overline\{(\d+)\}")


def _exact_decimals(text: str) -> str:
    """Rewrite decimals as exact fractions of their written digits (repeating bars included)."""

    def repeating(match: re.Match) -> str:
        return _fraction_latex(Fraction(int(match.group(1) or 0)) + Fraction(int(match.group(2)), 10 ** len(match.group(2)) - 1))

    def decimal(match: re.Match) -> str:
        whole, digits = match.group(1) or "0", match.group(2)
        value = Fraction(int(whole + digits), 10 ** len(digits))
        repeat = match.group(3) or match.group(4)
        if repeat:
            value += Fraction(int(repeat), (10 ** len(repeat) - 1) * 10 ** len(digits))
        return _fraction_latex(value)

    text = _REPEATING_ONLY.sub(repeating, text)
    return _DECIMAL.sub(decimal, text)


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth -= 1
    return deepest


def _fraction_latex(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"(\\frac{{{value.numerator}}}{{{value.denominator}}})"


def _expression(text: str) -> sympy.Expr | None:
    """Parse one scalar LaTeX expression to an evaluated, size-checked sympy expression, or None."""
    text = text.strip()
    if not text or len(text) > MAX_ANSWER_CHARS:
        return None
    text = _SCIENTIFIC.sub(r"\1\\times 10^{\2}", text)
    text = _UNBRACED_FRACTION.sub(lambda match: f"\\frac{{{match.group(1).strip('{}')}}}{{{match.group(2).strip('{}')}}}", text)
    text = _UNBRACED_ROOT.sub(lambda match: f"\\sqrt{match.group(1) or ''}{{{match.group(2)}}}", text)
    text = _UNBRACED_SUBSCRIPT.sub(r"_{\1}", text)
    text = _CIS.sub(r"\\exp i ", text)
    if _SPACED_DIGITS.search(text) or _nesting_depth(text) > MAX_NESTING_DEPTH:
        return None
    text = _exact_decimals(text)
    text = re.sub(r"\\text\{\s*([A-Za-z]+)\s*\}", r"\1", text)
    try:
        parsed = latex2sympy(text, normalization_config=None, conversion_config=_PARSER_CONFIG)
    except MemoryError:
        raise
    except Exception:
        return None
    if isinstance(parsed, sympy.UnevaluatedExpr):
        parsed = parsed.args[0]
    if not isinstance(parsed, sympy.Expr) or isinstance(parsed, sympy.Tuple):
        return None
    if parsed.is_Relational or _too_large(parsed):
        return None
    if any(isinstance(node, sympy.UnevaluatedExpr) for node in sympy.preorder_traversal(parsed)):
        parsed = parsed.replace(lambda node: isinstance(node, sympy.UnevaluatedExpr), lambda node: node.args[0])
    parsed = parsed.subs(_IMAGINARY_UNIT, sympy.I)
    try:
        evaluated = parsed.doit()
    except MemoryError:
        raise
    except Exception:
        return None
    if evaluated.has(sympy.Float):
        evaluated = evaluated.replace(lambda node: isinstance(node, sympy.Float), lambda node: sympy.Rational(str(node)))
    return evaluated


def _too_large(expr: sympy.Basic) -> bool:
    """True when evaluating ``expr`` could build a number with more than MAX_RESULT_DIGITS digits."""
    return _digit_bound(expr) > MAX_RESULT_DIGITS


def _digit_bound(expr: sympy.Basic) -> float:
    """An upper bound of log10 of the size of ``expr`` once evaluated; inf when it is unbounded."""
    if isinstance(expr, sympy.Rational):
        return math.log10(max(abs(expr.p), expr.q, 2))
    if expr.is_Atom:
        return 1.0
    child_bounds = [_digit_bound(arg) for arg in expr.args]
    if any(bound == math.inf for bound in child_bounds):
        return math.inf
    if isinstance(expr, sympy.Pow):
        base, exponent = expr.args
        if not exponent.is_number:
            return child_bounds[0] + 1
        if child_bounds[1] > 7:
            return math.inf
        if not base.is_number:
            # A power of a lone symbol stays one term; a power of a sum or product expands.
            if not base.is_Atom and exponent.is_Integer and abs(int(exponent)) > MAX_SYMBOLIC_POWER:
                return math.inf
            return child_bounds[0] + 1
        if not exponent.is_Integer and child_bounds[0] > MAX_FUNCTION_ARGUMENT_DIGITS:
            return math.inf
        if isinstance(exponent, sympy.Rational):
            # Exact: ``b^n`` has at most ``|n|`` times the digits of ``b`` (roots have fewer).
            return max(abs(float(exponent)), 1.0) * child_bounds[0]
        return 10 ** child_bounds[1] * child_bounds[0]
    if isinstance(expr, sympy.exp):
        # ``e^x`` has about 0.43 x digits.
        return math.inf if child_bounds[0] > 7 else 10 ** child_bounds[0] * 0.4343 + 1
    if isinstance(expr, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma)):
        if child_bounds[0] > 6:
            return math.inf
        size = 10 ** child_bounds[0]
        return size * math.log10(size + 1) + 1
    if isinstance(expr, sympy.binomial):
        if child_bounds[0] > 6:
            return math.inf
        return 10 ** child_bounds[0] * 0.30103 + 1
    if isinstance(expr, sympy.Mul):
        return sum(child_bounds) + 1
    largest = max(child_bounds, default=1.0)
    if not isinstance(expr, (sympy.Add, sympy.UnevaluatedExpr)) and largest > MAX_FUNCTION_ARGUMENT_DIGITS:
        return math.inf
    return largest + 1


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def answers_equal(answer: str, reference: str) -> bool:
    """Whether two answer strings are mathematically equal (see the module docstring)."""
    cleaned_answer, cleaned_reference = clean_answer(answer), clean_answer(reference)
    if not cleaned_answer.text or not cleaned_reference.text:
        return False
    if (
        canonical_text(cleaned_answer.text) == canonical_text(cleaned_reference.text)
        and cleaned_answer.percent == cleaned_reference.percent
    ):
        return True
    answer_readings = readings_of(cleaned_answer, is_reference=False)
    reference_choice = re.fullmatch(r"\(?([A-E])\)?", _unwrap_text(cleaned_reference.text))
    if reference_choice:
        return Reading("choice", reference_choice.group(1)) in answer_readings
    reference_readings = readings_of(cleaned_reference, is_reference=True)
    return any(
        _readings_equal(answer_reading, reference_reading)
        for reference_reading in reference_readings
        for answer_reading in answer_readings
    )


_COMPATIBLE = {
    ("text", "text"), ("expression", "expression"), ("tuple", "tuple"), ("set", "set"), ("set", "list"),
    ("list", "set"), ("list", "list"), ("interval", "interval"), ("union", "union"), ("matrix", "matrix"),
    ("equation", "equation"), ("vector", "tuple"), ("tuple", "vector"),
}
"""A vector (one row or one column) equals the tuple of its entries; a row vector and a column
vector have no compatible pair of readings but their matrix ones, so they stay different."""


def _readings_equal(first: Reading, second: Reading) -> bool:
    if (first.kind, second.kind) not in _COMPATIBLE:
        return False
    if first.name is not None and second.name is not None and first.name != second.name:
        return False  # ``y = 3`` does not answer ``x = 3``, though ``3`` does.
    if first.kind == "text":
        return first.value == second.value
    if first.kind == "expression":
        return values_equal(first.value, second.value)
    if first.kind == "equation":
        return _equations_equal(first.value, second.value)
    if first.kind in ("tuple", "vector"):
        return len(first.value) == len(second.value) and all(
            values_equal(a, b) for a, b in zip(first.value, second.value)
        )
    if first.kind in ("set", "list"):
        unique = first.kind == "set" or second.kind == "set"
        return _unordered_equal(first.value, second.value, unique)
    if first.kind == "interval":
        return _intervals_equal(first.value, second.value)
    if first.kind == "union":
        return len(first.value) == len(second.value) and _unordered_equal(
            first.value, second.value, False, compare=_intervals_equal
        )
    if first.kind == "matrix":
        return (
            len(first.value) == len(second.value)
            and all(len(a) == len(b) for a, b in zip(first.value, second.value))
            and all(values_equal(x, y) for a, b in zip(first.value, second.value) for x, y in zip(a, b))
        )
    return False


def _unordered_equal(first: tuple, second: tuple, unique: bool, compare=None) -> bool:
    """Multiset equality (set equality when ``unique``) under an exact, transitive equality."""
    compare = compare or values_equal
    if unique:
        first, second = _deduplicate(first, compare), _deduplicate(second, compare)
    if len(first) != len(second):
        return False
    unmatched = list(second)
    for item in first:
        for index, candidate in enumerate(unmatched):
            if compare(item, candidate):
                del unmatched[index]
                break
        else:
            return False
    return True


def _deduplicate(items: tuple, compare) -> tuple:
    kept: list = []
    for item in items:
        if not any(compare(item, other) for other in kept):
            kept.append(item)
    return tuple(kept)


def _intervals_equal(first: Interval, second: Interval) -> bool:
    return (
        first.left_closed == second.left_closed
        and first.right_closed == second.right_closed
        and values_equal(first.left, second.left)
        and values_equal(first.right, second.right)
    )


def _equations_equal(first: sympy.Expr, second: sympy.Expr) -> bool:
    """``l1 = r1`` equals ``l2 = r2`` when ``l1 - r1`` is a nonzero constant multiple of ``l2 - r2``."""
    if values_equal(first, sympy.S.Zero) or values_equal(second, sympy.S.Zero):
        return False
    try:
        ratio = sympy.simplify(first / second)
    except MemoryError:
        raise
    except Exception:
        return False
    return bool(ratio.is_number and ratio != 0 and ratio.is_finite)


def values_equal(first: Any, second: Any) -> bool:
    """Exact equality of two parsed values (sympy expressions, or canonical text for unparsed items)."""
    if isinstance(first, str) or isinstance(second, str):
        return isinstance(first, str) and isinstance(second, str) and first == second
    if first == second:
        return True
    if first.is_Rational and second.is_Rational:
        return False
    if first.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) or second.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        return False
    try:
        difference = first - second
        if difference == 0:
            return True
        if _numerically_nonzero(difference):
            return False
        for simplifier in (sympy.expand, sympy.radsimp, sympy.cancel, sympy.simplify, _denest_then_simplify):
            if simplifier(difference) == 0:
                return True
        if not difference.free_symbols and _expand_numeric_constant(difference) == 0:
            return True
    except MemoryError:
        raise
    except Exception:
        return False
    return False


def _denest_then_simplify(expr: sympy.Expr) -> sympy.Expr:
    return sympy.simplify(sympy.sqrtdenest(sympy.expand(expr)))


def _expand_numeric_constant(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite a constant with no symbols into sums of simple parts, then simplify.

    ``e^{i\\pi/3}`` and ``\\cos\\theta + i\\sin\\theta`` become ``a + bi`` (polar and exponential
    forms), and logarithms of numbers split over prime factors (``\\log_2 9 = 2\\log_2 3``). Both are
    identities for constants; for symbols they would need assumptions (``\\log(xy)`` is not
    ``\\log x + \\log y`` for negative x), hence the restriction.
    """
    expanded = sympy.expand_log(expr, force=True, factor=True)
    if expanded.has(sympy.I):
        expanded = sympy.expand_complex(expanded)
    return sympy.simplify(expanded)


def _numerically_nonzero(difference: sympy.Expr) -> bool:
    """True only when a high-precision evaluation proves ``difference`` is not 0 (a fast reject).

    Symbols are replaced by a few seeded random rationals; a difference that is 0 at every point
    is not accepted here, only passed on to the symbolic check.
    """
    symbols = sorted(difference.free_symbols, key=str)
    generator = random.Random(len(symbols))
    points = [{}] if not symbols else [
        {symbol: sympy.Rational(generator.randint(1, 97), generator.randint(1, 89)) for symbol in symbols}
        for _ in range(3)
    ]
    for point in points:
        try:
            value = sympy.N(difference.subs(point), 40)
        except MemoryError:
            raise
        except Exception:
            continue
        if not value.is_number or value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
            continue
        magnitude = abs(complex(value)) if value.is_finite else math.inf
        if magnitude > 1e-25:
            return True
    return False
