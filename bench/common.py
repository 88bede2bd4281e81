"""Shared bits of the benchmarks: machine description, prompts, result line, a median timer."""
import json
import os
import platform
import statistics
import subprocess
import time

import torch

ARITH_QUESTIONS = [
    "What is 3 + 4?", "What is 8 - 5?", "What is 6 * 7?", "What is 12 + 9?",
    "What is 15 - 8?", "What is 9 * 3?", "What is 24 / 6?", "What is 7 + 8?",
]
SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        pass
    return info


def chat_prompts(tokenizer, questions=ARITH_QUESTIONS) -> list[list[int]]:
    from treepo.engine.tokenizer import chat_prompt_ids

    return [chat_prompt_ids(tokenizer, q + SUFFIX) for q in questions]


def print_table(rows: list[dict], cols: list[str]):
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in cols))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def names_flag(text: str, valid: tuple, what: str) -> list[str]:
    """The names of a comma-separated --<what> flag, each one of `valid` (at least one), else exit
    with a message that lists the valid names."""
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(f"--{what} {text!r}: give a comma-separated subset of {', '.join(valid)}")
    return names


def result_line(name: str, payload: dict):
    print(json.dumps({"bench": name, "machine": machine(), **payload}))


def median_ms(f, repeat: int) -> float:
    """Median wall time of f() in ms over `repeat` calls, after one warm-up call."""
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def interleaved(fns: dict, repeat: int) -> dict:
    """Median ms of each function, called in turn (so a load change on the machine hits all alike),
    after one warm-up call each."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
