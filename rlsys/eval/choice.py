"""Multiple-choice answers (GPQA style): the reference is a letter, the response names one.

Choices:
- A reference is a choice when it is one letter A-J, alone or in parentheses ("C", "(C)").
  Answer type ``auto`` makes a benchmark ``choice`` when every reference of every problem is
  one, else ``math`` (the training reward's exact-answer check).
- The response's letter, in order of precedence:
  1. The last ``\\boxed{...}`` (found by the training reward's own extractor). When there is a
     box it decides alone: its content must be a letter, optionally in parentheses or in
     ``\\text{}``-style wrappers, followed by nothing, a space, ".", ":" or ")" ("C", "(C)",
     "\\text{C}", "(C) 4.5 eV"). A box holding anything else ("42", "CO_2", "A, B") gives no
     letter.
  2. Else the last "answer: X", "answer is X" or "answer is (X)" ("Answer" in any case, markdown
     ``**`` allowed around the colon), the letter not followed by a letter or digit.
  3. Else a letter alone or in parentheses at the end of the last line ("... the answer is
     option C", "(C).", a last line "B").
  Letters are upper case only: a lower-case "a" is an article or a variable more often than an
  option.
- Correct when that letter equals a reference letter. The reward of a choice benchmark is the
  training reward (``RewardPool``: sandboxed, with its format and extra terms) with its
  exact-answer part (``correct_score`` or ``wrong_score``) replaced by the letter check's; a
  response the pool failed on (timeout, crash, too long) keeps ``wrong_score`` and counts as
  wrong, as in training. The letter check itself runs in the caller's process: it is a few
  linear regular-expression scans of at most ``MAX_RESPONSE_CHARS`` characters, nothing that
  can hang or blow up on hostile text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from rlsys.reward.math import MAX_RESPONSE_CHARS, extract_boxed_answer

ANSWER_TYPES = ("auto", "math", "choice")

_REFERENCE_LETTER = re.compile(r"\(?([A-J])\)?")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}")
_BOXED_LETTER = re.compile(r"\(?([A-J])\)?(?=[\s.:)]|$)")
_ANSWER_PHRASE = re.compile(r"(?<![A-Za-z])(?i:answer)(?:\s+is)?[\s:*]*\(?([A-J])\)?(?![A-Za-z0-9])")
_FINAL_LETTER = re.compile(r"(?:^|\s)\(?([A-J])\)?\.?$")


def reference_letter(reference: str) -> str | None:
    """The letter of a choice reference ("C" or "(C)"), or None when it is not one."""
    match = _REFERENCE_LETTER.fullmatch(reference.strip())
    return match.group(1) if match else None


def is_choice_benchmark(references: Iterable[Iterable[str]]) -> bool:
    """True when there is at least one problem and every reference of every problem is a letter."""
    seen = False
    for answers in references:
        for answer in answers:
            seen = True
            if reference_letter(answer) is None:
                return False
    return seen


def extract_choice(response: str) -> str | None:
    """The letter a response chose (see the module docstring for the rules), or None."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return None
    boxed = extract_boxed_answer(response)
    if boxed is not None:
        content = _TEXT_WRAPPER.sub(r"\1", boxed).replace("$", "").strip()
        match = _BOXED_LETTER.match(content)
        return match.group(1) if match else None
    phrases = _ANSWER_PHRASE.findall(response)
    if phrases:
        return phrases[-1]
    last_line = response.rstrip().rsplit("\n", 1)[-1]
    match = _FINAL_LETTER.search(last_line)
    return match.group(1) if match else None


def choice_correct(response: str, references: Iterable[str]) -> tuple[bool, str | None]:
    """(correct, chosen letter) of a response against the letters of ``references``."""
    letter = extract_choice(response)
    letters = {reference_letter(reference) for reference in references} - {None}
    return letter is not None and letter in letters, letter
