"""Format reward: the whole response is ``<think>...</think>`` followed by ``<answer>...</answer>``.

The shape is the DeepSeek-R1-Zero one: optional surrounding whitespace, one think block, only
whitespace between the blocks, one non-empty answer block, nothing after it, and no tag repeated
or nested. The value is 1.0 for that shape and 0.0 otherwise; ``RewardConfig.format_weight``
scales it and 0 turns it off. A prompt that already ends with ``<think>`` leaves the opening tag
out of the response; callers in that setup prepend it before scoring.

Checked with ``str.find`` and counts instead of a regular expression, so a long response costs
a few linear scans and no backtracking.
"""

from __future__ import annotations

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_score(response: str) -> float:
    """1.0 when ``response`` has the think-then-answer shape, else 0.0."""
    if not isinstance(response, str):
        return 0.0
    text = response.strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    think_open, think_close, answer_open, answer_close = (text.find(tag) for tag in _TAGS)
    if think_open != 0 or not text.endswith("</answer>"):
        return 0.0
    if not think_open < think_close < answer_open < answer_close:
        return 0.0
    if text[think_close + len("</think>") : answer_open].strip():
        return 0.0
    if not text[answer_open + len("<answer>") : answer_close].strip():
        return 0.0
    return 1.0
