"""Prompt templates: the text wrapped around a dataset's prompt before the model sees it.

``data.prompt_template`` names a preset below or is a template string of its own; either way the
dataset's prompt replaces every ``{prompt}`` in it. These presets are the shared ones: the data
loader and anything else that renders training-style prompts take them from here.

Choices
    * Substitution is ``str.replace`` of the literal ``{prompt}``, not ``str.format``: math prompts
      are full of braces (``\\frac{1}{2}``, ``\\boxed{}``), and the templates themselves contain
      ``\\boxed{}``. The prompt is inserted once and never scanned again, so a prompt that itself
      contains ``{prompt}`` stays as written.
    * A string that is neither a preset name nor contains ``{prompt}`` is an error naming
      ``data.prompt_template``; it is almost always a misspelt preset, and using it as a fixed
      prompt would silently train every step on the same text.
    * ``r1_zero`` is DeepSeek-R1-Zero's template, which ends the prompt inside the opening
      ``<think>`` tag, so the response starts with the reasoning itself. One sentence is added:
      the reward reads the last ``\\boxed{}`` of a response, so the template asks for the final
      answer in ``\\boxed{}`` inside the answer tags.
    * ``boxed`` is the instruction Qwen2.5-Math and DeepSeek-R1 recommend for math problems.
"""

from __future__ import annotations

PLACEHOLDER = "{prompt}"

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. Inside the answer tags, the final answer is written within \\boxed{}.\n"
    "User: {prompt}\n"
    "Assistant: <think>"
)
"""DeepSeek-R1-Zero's prompt, with the final answer asked for in ``\\boxed{}`` (what the reward reads)."""

BOXED = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."
"""The step-by-step instruction recommended for Qwen2.5-Math and DeepSeek-R1 models."""

PRESETS: dict[str, str] = {"r1_zero": R1_ZERO, "boxed": BOXED}


def resolve_template(name_or_template: str) -> str:
    """The template text of a preset name, or ``name_or_template`` itself when it holds ``{prompt}``."""
    if name_or_template in PRESETS:
        return PRESETS[name_or_template]
    if PLACEHOLDER in name_or_template:
        return name_or_template
    # Imported here so rlsys.config may itself use this module to check data.prompt_template.
    from rlsys.config import ConfigError

    raise ConfigError(
        f"data.prompt_template: {name_or_template!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
        f"nor a template containing {PLACEHOLDER}"
    )


def apply_template(template: str, prompt: str) -> str:
    """``template`` with every ``{prompt}`` replaced by ``prompt`` (no other brace is interpreted)."""
    return template.replace(PLACEHOLDER, prompt)
