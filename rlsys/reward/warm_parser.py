"""Imported by the sandbox's fork server so that every worker starts with a warm LaTeX parser.

The ANTLR parser behind latex2sympy2_extended builds its prediction cache lazily: the first parse
of each new shape of input costs up to a second, the next ones milliseconds. Importing this
module compares a set of representative answers once; in the fork server that fills the cache in
memory that every forked worker inherits, including the replacements of workers killed after a
timeout. With the spawn start method each worker imports it in its initializer instead. Anywhere
else, importing it only costs those ~2.5 seconds.
"""

from __future__ import annotations

from rlsys.reward.math import answers_equal

REPRESENTATIVE_ANSWERS = (
    "3",
    "-\\frac{3}{4}",
    "2\\sqrt{3}+1",
    "16-4\\pi",
    "4(4-\\pi)",
    "x^2+2x+1",
    "(x+1)(x-2)",
    "2+3i",
    "\\frac{\\sqrt{6}+\\sqrt{2}}{2}",
    "3\\times 10^{5}",
    "y=2x+3",
    "(1,2)",
    "\\{1,2\\}",
    "[0,\\infty)",
    "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
    "\\log_2 8",
    "2e^{i\\pi/3}",
    "\\sin 30^\\circ",
    "5!",
    "\\binom{5}{2}",
    "e^{2}",
    "\\sin x",
    "1+1+1+1",
)


def warm() -> None:
    for answer in REPRESENTATIVE_ANSWERS:
        try:
            answers_equal(answer, answer + "+0")
        except Exception:
            # A failed warm-up only leaves part of the cache cold; it must not stop the fork
            # server, which would take every pool down with it.
            continue


warm()
