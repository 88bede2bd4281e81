"""Reward functions and checkers in worker processes (treepo/train/rewards/worker.py, docs/training.md
section 5, issue 12 items 6 and 7): a call stuck in a CPU loop is killed at its deadline and its
worker replaced, leaving no thread or process spinning; sys.exit, os._exit, 1e308, NaN and
non-numbers are scored failures with their reason logged; results equal in-thread ones; workers
see the parent's sys.path, survive the thread that started them, and die with their parent,
SIGKILLed mid-verification or not. The reward functions are in tests/reward_fixtures.py."""
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import reward_fixtures

from treepo.train.rewards import score_batch, scoring
from treepo.train.rewards.worker import RewardTimeout, WorkerError, WorkerExited, WorkerPool, WorkerStartError

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from /proc (Linux)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """/proc/pid/stat's fields after the command name (0: state, 1: ppid, 11/12: utime/stime); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in "ZX"  # a zombie is dead: it waits only to be reaped


def _children() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and (_stat(int(d)) or [0, 0])[1] == str(os.getpid())]


def _cpu_s(pids: list[int], over_s: float = 0.5) -> dict[int, float]:
    """CPU seconds each process uses over `over_s` seconds of wall time (a spinning one: ~over_s)."""
    def ticks(p):
        st = _stat(p)
        return 0 if st is None else int(st[11]) + int(st[12])

    before = {p: ticks(p) for p in pids}
    time.sleep(over_s)
    return {p: (ticks(p) - t) / TICK for p, t in before.items()}


@pytest.fixture(autouse=True)
def _close_workers():
    yield
    scoring.close_workers()


def test_spinning_reward_fn_is_killed_and_nothing_spins_on(caplog):
    """Before: each overrun left a thread spinning in the loop (55 after two steps, the GIL starved,
    the run never ended). Now the worker is killed at the deadline and replaced."""
    fn = reward_fixtures.by_text  # a module-level function: the worker imports it by name
    score_batch(fn, ["ok"], [{}], timeout_s=5.0)  # start-up, outside the timing
    threads = set(threading.enumerate())
    first = scoring._pools[("reward_fixtures:by_text", 1)].pids()
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="treepo.train.rewards.scoring"):
        r, acc, failures = score_batch(fn, ["ok", "spin", "ok", "spin", "ok"], [{}] * 5, timeout_s=0.5)
    elapsed = time.perf_counter() - t0
    assert r == [0.5, -1.0, 0.5, -1.0, 0.5] and acc == [1.0, 0.0, 1.0, 0.0, 1.0] and failures == 2
    assert elapsed < 4.0, f"two 0.5 s timeouts took {elapsed:.2f}s"  # 2 x 0.5 s + two ~0.1 s restarts
    assert "2/5 reward calls failed" in caplog.text and "RewardTimeout: ran past timeout_s=0.5" in caplog.text
    assert set(threading.enumerate()) == threads  # no thread of ours left behind
    pool = scoring._pools[("reward_fixtures:by_text", 1)]
    assert pool.restarts == 2 and pool.pids() != first and not any(_alive(p) for p in first)
    kids = _children()
    assert set(pool.pids()) <= set(kids)
    spent = _cpu_s(kids)
    assert all(s < 0.25 for s in spent.values()), f"a child process spins on: {spent}"


def test_exits_and_bad_values_are_scored_failures_with_reasons(caplog):
    """Before: sys.exit in the function ended the run, and 1e308 (finite, but the group mean is inf and
    every advantage NaN) was a reward."""
    texts = ["exit", "huge", "nan", "inf", "str", "none", "big", "die", "boom", "print", "ok"]
    with caplog.at_level(logging.WARNING, logger="treepo.train.rewards.scoring"):
        r, acc, failures = score_batch("reward_fixtures:by_text", texts, [{}] * len(texts), timeout_s=5.0)
    assert r == [-1.0] * 9 + [0.5, 0.5] and acc == [0.0] * 9 + [1.0, 1.0] and failures == 9
    log = caplog.text  # per type of failure: its count and the first one's reason
    assert "9/11 reward calls failed (scored -1): 1x, first response 0: SystemExit: 3; 3x, first response 1: " \
           "ValueError: reward 1e+308 is not a finite number within +-1e+06; 2x, first response 4: TypeError" in log
    assert "OverflowError" in log and "WorkerExited: worker exited with code 7" in log and "KeyError: 'no such" in log
    assert scoring._pools[("reward_fixtures:by_text", 1)].restarts == 1  # only os._exit cost a worker
    for text, reason in [("nan", "reward nan is not a finite"), ("inf", "reward inf is not a finite"),
                         ("none", "TypeError: float() argument must be a string or a real number, not 'NoneType'"),
                         ("str", "TypeError: returned a str, not a number: '0.5'")]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="treepo.train.rewards.scoring"):
            assert score_batch("reward_fixtures:by_text", [text], [{}], timeout_s=5.0) == ([-1.0], [0.0], 1)
        assert "1/1 reward calls failed (scored -1): 1x, first response 0: " in caplog.text, caplog.text
        assert reason in caplog.text, caplog.text


def test_worker_results_equal_in_thread_results_for_any_pool_size():
    samples = [{"response_ids": list(range(i, i + 3 * i + 1))} for i in range(40)]
    texts = ["x"] * len(samples)
    here = score_batch(reward_fixtures.even_ids, texts, samples, timeout_s=None)
    assert len(set(here[0])) > 5
    assert score_batch(reward_fixtures.even_ids, texts, samples, timeout_s=5.0) == here
    assert score_batch("reward_fixtures:even_ids", texts, samples, timeout_s=5.0, workers=3) == here


def test_a_pool_runs_its_calls_in_parallel():
    pool = WorkerPool("reward_fixtures:by_text", size=2)
    try:
        pool.run([("ok", {}), ("ok", {})], timeout_s=5.0)  # both started
        t0 = time.perf_counter()
        out = pool.run([("sleep", {})] * 4 + [("ok", {})], timeout_s=0.5)
        elapsed = time.perf_counter() - t0
        assert [type(o) for o in out[:4]] == [RewardTimeout] * 4 and out[4] == 0.5
        assert elapsed < 1.9, f"4 overruns of 0.5 s on 2 workers took {elapsed:.2f}s (one after another: >= 2 s)"
    finally:
        pool.close()
    assert pool.pids() == []


def test_worker_sees_the_parents_sys_path(tmp_path, monkeypatch):
    (tmp_path / "my_reward_mod_xyz.py").write_text("def score(text, sample):\n    return len(text) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # e.g. PYTHONPATH, or a path the caller added
    assert score_batch("my_reward_mod_xyz:score", ["abc", "abcd"], [{}, {}], timeout_s=5.0)[0] == [0.3, 0.4]


def test_problem_scorer_imports_the_reward_fn_only_in_its_workers(tmp_path, monkeypatch):
    from treepo.train.data import Problem
    from treepo.train.rewards.problems import ProblemScorer

    (tmp_path / "heavy_reward_mod_xyz.py").write_text(
        "import os\nPID = os.getpid()  # a reward model would load here\n"
        "def score(text, sample):\n    return 1.0 if text == sample['answer'] else -1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = ProblemScorer("heavy_reward_mod_xyz:score", timeout_s=5.0)  # started: the first batch need not wait
    assert "heavy_reward_mod_xyz" not in sys.modules
    probs = [Problem("q", "7", "src"), Problem("q", "8", "src")]
    assert scorer.score(["7", "7"], probs, [[1], [2]]) == ([1.0, -1.0], [1.0, 0.0], 0)
    with pytest.raises(ValueError, match="reward_fn='heavy_reward_mod_xyz:nope': cannot load it in a worker process: "
                                         "AttributeError: module 'heavy_reward_mod_xyz' has no function 'nope'"):
        ProblemScorer("heavy_reward_mod_xyz:nope")
    assert "heavy_reward_mod_xyz" not in sys.modules


def test_a_worker_that_cannot_start_is_a_clear_error():
    pool = WorkerPool("no_such_module_xyz:fn")
    with pytest.raises(WorkerStartError, match="'no_such_module_xyz:fn': cannot load it in a worker process: "
                                                "ImportError: cannot import module 'no_such_module_xyz'"):
        pool.run([("a", {})], timeout_s=5.0)
    with pytest.raises(WorkerStartError, match="has no function 'nope'"):
        WorkerPool("reward_fixtures:nope").run([("a", {})], timeout_s=5.0)
    out = WorkerPool("os.path:join").run([("a", "b")], timeout_s=5.0)  # a string is not a number
    assert isinstance(out[0], WorkerError) and "TypeError: returned a str" in str(out[0])
    with pytest.raises(ValueError, match="size=0"):
        WorkerPool("reward_fixtures:by_text", size=0)


def test_a_worker_outlives_the_thread_that_started_it():
    """Linux's parent-death signal follows the thread that started the child: a worker started from
    a short-lived thread must not die with it (such workers are started from a long-lived thread)."""
    pool = WorkerPool("reward_fixtures:by_text")
    try:
        got = {}
        t = threading.Thread(target=lambda: got.update(r=pool.run([("ok", {})], timeout_s=5.0)))
        t.start()
        t.join(30)
        assert got["r"] == [0.5]
        (pid,) = pool.pids()
        time.sleep(0.3)
        assert _alive(pid) and pool.run([("ok", {})], timeout_s=5.0) == [0.5] and pool.pids() == [pid]
        assert pool.restarts == 0
    finally:
        pool.close()


def test_a_worker_lost_mid_call_is_replaced():
    pool = WorkerPool("reward_fixtures:by_text")
    try:
        out = pool.run([("ok", {}), ("die", {}), ("ok", {})], timeout_s=5.0)
        assert out[0] == out[2] == 0.5 and isinstance(out[1], WorkerExited) and "code 7" in str(out[1])
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)  # lost while idle: the next call goes to a fresh worker
        time.sleep(0.2)
        assert pool.run([("ok", {})], timeout_s=5.0) == [0.5] and pool.pids() != [pid]
    finally:
        pool.close()


# --------------------------------------------------------------------------- workers die with their parent

PARENT = {
    # sympy on 9^{9^{9^{9}}} computes a huge power in C, holding the GIL: only the death signal stops it
    "math-verify": """
        from treepo.train.rewards import math_reward, verifier
        assert math_reward("\\\\boxed{x + 1}", "1+x") == 1.0
        print(verifier._math_verify.pids()[0], flush=True)
        math_reward("\\\\boxed{9^{9^{9^{9}}}}", "1", timeout_s=600)
    """,
    # worker.py imports only the standard library: loaded by path, the parent starts without torch
    "reward_fn": """
        import importlib.util
        spec = importlib.util.spec_from_file_location("worker", "treepo/train/rewards/worker.py")
        worker = importlib.util.module_from_spec(spec); spec.loader.exec_module(worker)
        pool = worker.WorkerPool("reward_fixtures:by_text")
        assert pool.run([("ok", {})], timeout_s=60) == [0.5]
        print(pool.pids()[0], flush=True)
        pool.run([("spin", {})], timeout_s=600)
    """,
    "normal exit": """
        import importlib.util
        spec = importlib.util.spec_from_file_location("worker", "treepo/train/rewards/worker.py")
        worker = importlib.util.module_from_spec(spec); spec.loader.exec_module(worker)
        pool = worker.WorkerPool("reward_fixtures:by_text")
        assert pool.run([("ok", {})], timeout_s=60) == [0.5]
        print(pool.pids()[0], flush=True)
        import sys; sys.stdin.readline()  # exit once the test has seen the worker alive
    """,
}


@pytest.mark.parametrize("case", list(PARENT))
def test_no_worker_outlives_its_parent(case):
    """Before: after the parent was SIGKILLed mid-verification, the math-verify worker ran on under
    PID 1 at 66% CPU with growing memory."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PARENT[case])], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, env=env, text=True, cwd=ROOT)
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        if case == "normal exit":
            parent.stdin.write("\n")
            parent.stdin.flush()
            assert parent.wait(60) == 0
        else:
            deadline = time.monotonic() + 30
            while _stat(pid)[0] != "R" and time.monotonic() < deadline:  # mid-call: computing
                time.sleep(0.1)
            time.sleep(0.5)
            assert _alive(pid) and _stat(pid)[0] == "R"
            parent.send_signal(signal.SIGKILL)
            parent.wait(10)
        deadline = time.monotonic() + 5.0
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"worker {pid} outlived its parent ({case}): {_stat(pid)}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
