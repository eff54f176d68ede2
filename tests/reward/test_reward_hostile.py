"""Model output as an attacker would write it.

* Nothing in a response or a reference is ever evaluated as Python: payloads that would create a
  file or open a connection if they were, placed in every answer form the verifier parses, are
  checked in this process (where no guard would stop them) and through the pool, and a file
  and a listening socket show that none of them ran. A control run evaluates each payload in a
  child interpreter to show that it is live.
* Every check is bounded: exploding numbers are refused before evaluation, a check that really
  grows without end is killed at the time limit or stopped by the memory limit.
* Giant responses (1 MB, 10,000 nested braces, thousands of unclosed boxes) score wrong quickly.
* A worker killed with SIGKILL in the middle of a check costs that item only: it is counted as a
  crash, the caller gets its batch back, and the pool replaces the worker.
"""

from __future__ import annotations

import ast
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlsys.config import RewardConfig, RewardTerm
from rlsys.reward.guard import no_side_effects
from rlsys.reward.math import MAX_RESPONSE_CHARS, compute_score
from rlsys.reward.pool import STATUS_CRASH, STATUS_OK, STATUS_TIMEOUT, STATUS_TOO_LONG, RewardPool

THIS_MODULE = __name__
REWARD_SOURCES = sorted((Path(__file__).resolve().parents[2] / "rlsys" / "reward").glob("*.py"))

# Each payload creates the file {marker} or connects to 127.0.0.1:{port} when evaluated as Python
# (by eval, exec, sympify or parse_expr). The marker directory has no underscore, so that no
# LaTeX-looking rewrite of ``_`` could defuse a payload before it reached an evaluator.
PAYLOADS = [
    "__import__('os').system('touch {marker}')",
    "open('{marker}', 'w').write('x')",
    "__import__('pathlib').Path('{marker}').touch()",
    "__import__('subprocess').call(['touch', '{marker}'])",
    "exec(\"open('{marker}', 'w')\")",
    "eval(\"__import__('os').system('touch {marker}')\")",
    "(lambda: __import__('os').system('touch {marker}'))()",
    "getattr(__import__('os'), 'sys' + 'tem')('touch {marker}')",
    "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0](['touch', '{marker}'])",
    "__import__('socket').create_connection(('127.0.0.1', {port}))",
]
# Every shape of answer the verifier reads, with the payload where a value would be.
FORMS = [
    "{p}", "\\text{{{p}}}", "\\mathrm{{{p}}}", "\\operatorname{{{p}}}(1)", "\\frac{{{p}}}{{2}}", "\\frac{{1}}{{{p}}}",
    "\\dfrac{p}2", "({p}, 1)", "[{p}, 1)", "\\{{{p}, 1\\}}", "{p}, 1", "{p} \\text{{ or }} 2", "x = {p}",
    "y = 1 = {p}", "f(x) = {p}", "{p} = 7", "\\begin{{pmatrix}} {p} \\\\ 1 \\end{{pmatrix}}",
    "\\begin{{bmatrix}} {p} & 1 \\\\ 2 & 3 \\end{{bmatrix}}", "(-\\infty, {p}) \\cup (1, \\infty)",
    "\\mathbb{{R}} \\setminus [{p}, 1]", "\\mathbb{{R}} \\setminus \\{{{p}\\}}", "x < {p}", "x < 1 \\text{{ or }} x > {p}",
    "{p} \\pm 1", "{p}\\%", "\\${p}", "{p}^\\circ", "\\sin({p}^\\circ)", "\\sqrt{{{p}}}", "\\sqrt[3]{{{p}}}", "2^{{{p}}}",
    "e^{{i {p}}}", "\\log_{{{p}}} 2", "\\ln({p})", "\\sin {p}", "{p}!", "\\binom{{{p}}}{{2}}", "|{p}|",
    "{p} \\text{{ meters}}", "\\text{{{p} meters}}", "\\text{{five {p}}}", "\\textbf{{(A) }} {p}", "0.{p}",
    "{p} \\times 10^{{5}}", "\\langle {p}, 1 \\rangle", "\\operatorname{{cis}} {p}",
]


@pytest.fixture()
def traps():
    """A marker directory that must stay empty and a listening socket that must get no connection."""
    directory = Path("/tmp") / f"rlsyshostile{secrets.token_hex(6)}"
    directory.mkdir()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.setblocking(False)
    try:
        yield directory, listener
    finally:
        listener.close()
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


def hostile_inputs(directory: Path, port: int) -> list[tuple[str, str, str]]:
    """(response, reference, marker name): every payload in every form, in the response's box and
    as the reference, and once as bare text around a box."""
    inputs = []
    for payload_index, payload in enumerate(PAYLOADS):
        for form_index, form in enumerate(FORMS):
            for side in ("response", "reference"):
                name = f"m{payload_index}x{form_index}{side[:3]}"
                code = payload.format(marker=directory / name, port=port)
                answer = form.format(p=code)
                if side == "response":
                    inputs.append((f"Let me evaluate {code}. So the answer is \\boxed{{{answer}}}.", "1", name))
                else:
                    inputs.append(("\\boxed{1}", answer, name))
        name = f"m{payload_index}bare"
        code = payload.format(marker=directory / name, port=port)
        inputs.append((f"{code}\n\\boxed{{{code}}} $${code}$$", "1", name))
    return inputs


def assert_nothing_ran(directory: Path, listener: socket.socket) -> None:
    created = sorted(path.name for path in directory.iterdir())
    assert created == [], f"payloads ran: {created}"
    with pytest.raises(BlockingIOError):
        connection, _ = listener.accept()
        connection.close()


def test_the_payloads_are_live_when_evaluated(traps):
    """Control: evaluated by Python (as sympify would, with sympy's names), each payload acts."""
    directory, listener = traps
    port = listener.getsockname()[1]
    programs = [
        f"import subprocess, sympy\neval({payload.format(marker=directory / f'control{index}', port=port)!r}, {{'Symbol': sympy.Symbol}})"
        for index, payload in enumerate(PAYLOADS)
    ]
    for program in programs:
        subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, timeout=60)
    file_payloads = [index for index, payload in enumerate(PAYLOADS) if "{marker}" in payload]
    assert sorted(path.name for path in directory.iterdir()) == sorted(f"control{index}" for index in file_payloads)
    listener.setblocking(True)
    listener.settimeout(5.0)
    connection, _ = listener.accept()
    connection.close()


def test_no_payload_is_evaluated_in_process(traps):
    """In the calling process no guard is active, so an evaluation would leave its mark."""
    directory, listener = traps
    inputs = hostile_inputs(directory, listener.getsockname()[1])
    assert len(inputs) == len(PAYLOADS) * (2 * len(FORMS) + 1) >= 900
    for response, reference, name in inputs:
        assert compute_score(response, reference) == -5.0, name
    assert_nothing_ran(directory, listener)


def test_no_payload_is_evaluated_through_the_pool(traps):
    directory, listener = traps
    inputs = hostile_inputs(directory, listener.getsockname()[1])
    with RewardPool(RewardConfig(timeout_s=5.0, num_workers=2)) as pool:
        result = pool.score_batch([response for response, _, _ in inputs], [reference for _, reference, _ in inputs])
    assert result.scores == [-5.0] * len(inputs)
    assert set(result.statuses) == {STATUS_OK}, result.errors
    assert_nothing_ran(directory, listener)


EVALUATING_NAMES = {"eval", "exec", "sympify", "parse_expr", "S", "lambdify", "__import__", "parse_latex"}
"""Called as ``name(...)`` or ``module.name(...)``; the builtin ``compile`` is refused only as a bare
name, since ``re.compile`` is everywhere."""


@pytest.mark.parametrize("path", REWARD_SOURCES, ids=[path.name for path in REWARD_SOURCES])
def test_no_reward_module_calls_an_evaluator(path):
    """The static half of the proof: no call in rlsys/reward reaches eval, exec or sympy's
    string evaluators; answer text only reaches latex2sympy, whose ANTLR parser builds sympy
    objects directly (``parse_expr`` there only reads ``variable_values``, which we never pass)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
            assert name not in EVALUATING_NAMES, f"{path.name}:{node.lineno} calls {name}"
            assert not (isinstance(function, ast.Name) and name == "compile"), f"{path.name}:{node.lineno} calls compile"
            if name == "latex2sympy":
                assert all(keyword.arg != "variable_values" for keyword in node.keywords)
        if isinstance(node, ast.ImportFrom):
            imported = {alias.name for alias in node.names}
            assert not imported & EVALUATING_NAMES, f"{path.name}:{node.lineno} imports {imported & EVALUATING_NAMES}"


def test_the_guard_refuses_side_effects_while_checking(traps):
    directory, listener = traps
    port = listener.getsockname()[1]
    marker = directory / "guarded"
    readable = Path(__file__)
    attempts = [
        lambda: eval(PAYLOADS[0].format(marker=marker, port=port)),
        lambda: eval(PAYLOADS[1].format(marker=marker, port=port)),
        lambda: eval(PAYLOADS[3].format(marker=marker, port=port)),
        lambda: eval(PAYLOADS[9].format(marker=marker, port=port)),
        lambda: os.open(marker, os.O_CREAT | os.O_WRONLY),
        lambda: os.remove(readable.with_name("no-such-file")),
    ]
    with no_side_effects():
        assert readable.read_text(encoding="utf-8")
        for attempt in attempts:
            with pytest.raises(PermissionError):
                attempt()
    assert_nothing_ran(directory, listener)
    marker.write_text("outside the guard writing works again")
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# Bounded time and memory
# --------------------------------------------------------------------------------------------

EXPLODING = [
    ("\\boxed{9^{9^{9^{9}}}}", "9^{9^{9^{9}}}+1"),
    ("\\boxed{(10^{10})!}", "(10^{10})!+1"),
    ("\\boxed{10^{10^{10}}}", "10^{10^{10}}-1"),
    ("\\boxed{2^{10^{6}}}", "2^{10^{6}}+1"),
    ("\\boxed{\\frac{2^{10^{7}}}{2^{10^{7}-2}}}", "4"),
    ("\\boxed{(x+1)^{1000000}}", "(x+1)^{999999}(x+1)"),
    ("\\boxed{\\binom{10^{9}}{5 \\cdot 10^{8}}}", "1"),
    ("\\boxed{((((9!)!)!)!)}", "1"),
    ("\\boxed{9!!!!!!!!!!!!}", "1"),
    ("\\boxed{e^{10^{99999}}}", "e^{10^{99999}}+1"),
    ("\\boxed{\\sqrt{10^{99999}+1}}", "\\sqrt{10^{99999}+2}"),
    ("\\boxed{\\sin(10^{99999})}", "\\sin(10^{99999}+1)"),
    ("\\boxed{\\log(2^{100000}+1)}", "100000\\log 2"),
    ("\\boxed{\\Gamma(10^{10})}", "1"),
    ("\\boxed{(x_1+x_2+x_3+x_4+x_5+x_6+x_7+x_8)^{64}}", "(x_8+x_7+x_6+x_5+x_4+x_3+x_2+x_1)^{63}"),
]
# Real work that never ends: expanding both sides needs hundreds of thousands of terms.
GROWING = ("\\boxed{(a+b+c+d+e+f)^{32}(a+b+c+d+e-f)^{32}}", "((a+b+c+d+e)^2-f^2)^{32}")
SLACK_S = 4.0


def test_exploding_numbers_score_wrong_without_being_evaluated():
    with RewardPool(RewardConfig(timeout_s=5.0, num_workers=2)) as pool:
        result = pool.score_batch([response for response, _ in EXPLODING], [reference for _, reference in EXPLODING])
    assert result.scores == [-5.0] * len(EXPLODING)
    assert result.statuses == [STATUS_OK] * len(EXPLODING), result.errors
    assert max(result.durations_s) < 2.0, result.durations_s


def test_a_check_that_really_keeps_working_is_killed_at_the_time_limit():
    config = RewardConfig(timeout_s=2.0, num_workers=1)
    with RewardPool(config) as pool:
        pool.score_batch(["\\boxed{1}"], ["1"])
        started = time.monotonic()
        result = pool.score_batch([GROWING[0], "\\boxed{4}"], [GROWING[1], "4"])
        elapsed = time.monotonic() - started
    assert result.statuses == [STATUS_TIMEOUT, STATUS_OK]
    assert result.scores == [-5.0, 5.0]
    assert elapsed < config.timeout_s + SLACK_S


def test_a_check_that_really_grows_is_stopped_by_the_memory_limit_or_the_time_limit():
    """How fast the expansion allocates depends on sympy's term order, which follows Python's
    hash seed: with a 400 MB limit it runs out of memory in about 5 s on most seeds and is still
    within the limit at 60 s on others, so either limit may be the one that stops it."""
    config = RewardConfig(timeout_s=10.0, num_workers=1, memory_limit_mb=400)
    with RewardPool(config) as pool:
        started = time.monotonic()
        result = pool.score_batch([GROWING[0], "\\boxed{4}"], [GROWING[1], "4"])
        elapsed = time.monotonic() - started
    assert result.statuses[0] in (STATUS_CRASH, STATUS_TIMEOUT)
    if result.statuses[0] == STATUS_CRASH:
        # Out of memory inside the check, or (rarely) inside pebble's own code around it.
        assert "MemoryError" in result.errors[0] or result.errors[0].startswith("worker died"), result.errors[0]
    assert result.statuses[1] == STATUS_OK
    assert result.scores == [-5.0, 5.0]
    assert elapsed < config.timeout_s + SLACK_S


# --------------------------------------------------------------------------------------------
# Giant responses
# --------------------------------------------------------------------------------------------

NESTED = 10_000
GIANT = [
    ("1 MB of text before a right box", "x" * 1_000_000 + "\\boxed{4}"),
    ("1 MB of boxes", "\\boxed{4}" * (1_000_000 // 9)),
    ("1 MB of open braces", "\\boxed{" + "{" * 1_000_000),
    ("10k nested braces in the box", "\\boxed{" + "{" * NESTED + "4" + "}" * NESTED + "}"),
    ("10k unclosed braces in the box", "\\boxed{" + "{" * NESTED + "4"),
    ("10k nested fractions", "\\boxed{" + "\\frac{1}{" * NESTED + "4" + "}" * NESTED + "}"),
    ("10k nested roots", "\\boxed{" + "\\sqrt{" * NESTED + "4" + "}" * NESTED + "}"),
    ("10k nested parentheses", "\\boxed{" + "\\left(" * NESTED + "4" + "\\right)" * NESTED + "}"),
    ("10k nested escaped braces", "\\boxed{" + "\\{" * NESTED + "4" + "\\}" * NESTED + "}"),
    ("28k unclosed boxes", "\\boxed{" * (MAX_RESPONSE_CHARS // 7)),
    ("28k boxes each on a new line", "\\boxed\n" * (MAX_RESPONSE_CHARS // 7)),
    ("500 nested parentheses in a short box", "\\boxed{" + "(" * 500 + "4" + ")" * 499 + "}"),
]


def test_giant_responses_score_wrong_quickly_and_the_pool_keeps_working():
    config = RewardConfig(timeout_s=5.0, num_workers=2)
    with RewardPool(config) as pool:
        pool.score_batch(["\\boxed{1}"] * 2, ["1"] * 2)
        started = time.monotonic()
        result = pool.score_batch([response for _, response in GIANT], ["4"] * len(GIANT))
        elapsed = time.monotonic() - started
        after = pool.score_batch(["\\boxed{4}", "\\boxed{\\frac{1}{2}}"], ["4", "0.5"])
    labels = [label for label, _ in GIANT]
    assert dict(zip(labels, result.scores)) == dict.fromkeys(labels, -5.0)
    assert set(result.statuses) <= {STATUS_OK, STATUS_TOO_LONG}, result.errors
    assert result.statuses[:3] == [STATUS_TOO_LONG] * 3
    assert max(result.durations_s) < 1.0, dict(zip(labels, result.durations_s))
    assert elapsed < config.timeout_s
    assert after.scores == [5.0, 5.0]


# --------------------------------------------------------------------------------------------
# A worker killed in the middle of a check
# --------------------------------------------------------------------------------------------


def pid_term(response: str, reference) -> float:
    """Writes the worker's pid to the file named after ``PIDFILE:``; with ``WAIT``, then keeps
    the check running, so that the test can kill the worker in the middle of it."""
    if "PIDFILE:" in response:
        path = Path(response.split("PIDFILE:")[1].split()[0])
        path.write_text(str(os.getpid()))
        if "WAIT" in response:
            time.sleep(60)
    return 0.0


def wait_for_pid(path: Path, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.01)
    raise AssertionError(f"no worker wrote {path}")


def test_a_worker_killed_mid_check_is_a_counted_crash_and_is_replaced(tmp_path):
    config = RewardConfig(timeout_s=30.0, num_workers=2, extra=[RewardTerm(path=f"{THIS_MODULE}:pid_term", weight=1.0)])
    victim_file = tmp_path / "victim"
    with RewardPool(config) as pool:
        pool.score_batch(["\\boxed{1}"] * 2, ["1"] * 2)
        batch: dict = {}
        responses = [f"PIDFILE:{victim_file} WAIT \\boxed{{4}}", "\\boxed{4}", "\\boxed{\\frac{1}{2}}", "\\boxed{x=3}"]
        caller = threading.Thread(target=lambda: batch.update(result=pool.score_batch(responses, ["4", "4", "0.5", "3"])))
        caller.start()
        victim = wait_for_pid(victim_file)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        caller.join(timeout=config.timeout_s)
        detected_s = time.monotonic() - killed_at
        assert not caller.is_alive(), "the caller hung after its worker was killed"
        result = batch["result"]
        assert result.statuses == [STATUS_CRASH, STATUS_OK, STATUS_OK, STATUS_OK]
        assert result.scores == [-5.0, 5.0, 5.0, 5.0]
        assert result.n_crash == 1
        assert "exit code -9" in result.errors[0]
        assert detected_s < 5.0, f"the kill took {detected_s:.2f}s to be reported"

        # The pool replaced the worker: a new batch fills both workers, neither is the victim.
        pid_files = [tmp_path / f"after{index}" for index in range(8)]
        after = pool.score_batch([f"PIDFILE:{path} \\boxed{{4}}" for path in pid_files], ["4"] * len(pid_files))
        assert after.scores == [5.0] * len(pid_files)
        assert victim not in {int(path.read_text()) for path in pid_files}


@pytest.mark.parametrize("pause_s", [0.0, 0.5], ids=["batch-at-once", "batch-after-detection"])
def test_a_worker_killed_between_checks_is_replaced(tmp_path, pause_s):
    """pebble gives up on the whole pool when an idle worker dies; the next batch, sent before or
    after pebble notices, still scores every item, on a fresh pool."""
    config = RewardConfig(timeout_s=10.0, num_workers=1, extra=[RewardTerm(path=f"{THIS_MODULE}:pid_term", weight=1.0)])
    with RewardPool(config) as pool:
        pool.score_batch([f"PIDFILE:{tmp_path / 'idle'} \\boxed{{1}}"], ["1"])
        victim = int((tmp_path / "idle").read_text())
        os.kill(victim, signal.SIGKILL)
        time.sleep(pause_s)
        result = pool.score_batch(["\\boxed{4}", "\\boxed{5}", f"PIDFILE:{tmp_path / 'next'} \\boxed{{6}}"], ["4", "4", "6"])
        assert result.scores == [5.0, -5.0, 5.0]
        assert result.statuses == [STATUS_OK] * 3
        assert pool.pool_restarts == 1
        assert int((tmp_path / "next").read_text()) != victim
        assert pool.score_batch(["\\boxed{4}"], ["4"]).scores == [5.0]
