"""Repeated preemption of a local two-process CPU job, counting how each trial ends.

Each trial starts `scripts/launch_local_cpu.sh 2 2` on a tiny char model, waits a random
time, sends SIGTERM to one process (its flag reaches the other at the next agreed check,
every 5 steps) and waits. A trial is "stopped" when both processes say they stopped at one step and
saved it, with exit 130. One still running `--hang-after` seconds after the signal is a
hang: the stacks of both processes are dumped with py-spy (when installed) into the output
folder, then the job is killed.

    python benchmarks/preemption_trials.py --data PREPARED_CHAR --trials 60 --out /tmp/pt
    python benchmarks/preemption_trials.py ... --load 1   # beside a busy process, as in CI
    python benchmarks/preemption_trials.py ... --no-signal 600 --log-every 200 --hang-after 120

`--load N` runs N busy-looping processes beside every trial: the first hang ever seen ran
beside another test job. The same launch with no signal at all and a long `--log-every`
is the sharper test of the deadlock this script found (NOTES.md, "Preemption on CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Flags the code before the fix took too, so one script measures both. A multi-process job
# makes no end sample.
FLAGS = ["--preset", "tiny", "--batch-size", "8", "--warmup-steps", "2", "--eval-batches", "1",
         "--no-progress", "--join-timeout", "120", "--eval-every", "50000"]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def dump_stacks(pids: list[int], where: Path) -> None:
    """Python stacks (py-spy) and native ones (gdb) of each process, where installed."""
    tools = {"py-spy": ["dump", "--pid"], "gdb": ["-batch", "-ex", "thread apply all bt", "-p"]}
    for pid in pids:
        with open(where / f"{pid}.stack", "w") as out:
            for tool, args in tools.items():
                path = shutil.which(tool)
                out.write(f"===== {tool}\n")
                if path is None:
                    out.write("not installed\n")
                    continue
                done = subprocess.run([path, *args, str(pid)], capture_output=True, text=True,
                                      timeout=300)
                out.write(done.stdout + done.stderr)


def _launch(run: Path, data: Path, log_every: int, max_steps: int):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    argv = ["bash", str(ROOT / "scripts" / "launch_local_cpu.sh"), "2", "2", "--",
            "--data", str(data), *FLAGS, "--max-steps", str(max_steps),
            "--log-every", str(log_every), "--out", str(run)]
    log = open(run.parent / f"{run.name}.log", "w")
    job = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    return job, log


def unsignalled(run: Path, data: Path, log_every: int, steps: int, hang_after: float) -> dict:
    """One launch of `steps` steps and no signal: "finished", or a "hang" after `hang_after` s."""
    job, log = _launch(run, data, log_every, steps)
    outcome = {"log_every": log_every, "steps": steps}
    start = time.monotonic()
    try:
        job.wait(timeout=hang_after)
        outcome["seconds"] = round(time.monotonic() - start, 1)
    except subprocess.TimeoutExpired:
        dump_stacks(children(job.pid), run.parent)
        return {**outcome, "end": "hang"}
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        log.close()
    done = f"step {steps}:" in (run.parent / f"{run.name}.log").read_text()
    return {**outcome, "end": "finished" if job.returncode == 0 and done else "other",
            "rc": job.returncode}


def trial(run: Path, data: Path, delay: float, log_every: int, hang_after: float) -> dict:
    """One launch, one SIGTERM `delay` seconds after the first train record; the outcome."""
    job, log = _launch(run, data, log_every, 100000)
    outcome = {"delay": round(delay, 2), "log_every": log_every}
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            if job.poll() is not None or time.monotonic() > deadline:
                return {**outcome, "end": "never trained", "rc": job.poll()}
            time.sleep(0.2)
        time.sleep(delay)
        procs = children(job.pid)
        if len(procs) != 2 or job.poll() is not None:
            return {**outcome, "end": "not two processes at the signal", "rc": job.poll()}
        os.kill(procs[-1], signal.SIGTERM)
        signalled = time.monotonic()
        try:
            job.wait(timeout=hang_after)
        except subprocess.TimeoutExpired:
            dump_stacks(procs, run.parent)
            return {**outcome, "end": "hang", "pids": procs}
        outcome["seconds_to_stop"] = round(time.monotonic() - signalled, 1)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        log.close()
    text = (run.parent / f"{run.name}.log").read_text()
    stopped = re.findall(r"gptjax: stopped by [^\n]*? at step (\d+)", text)
    ok = job.returncode == 130 and len(stopped) == 2 and len(set(stopped)) == 1
    return {**outcome, "end": "stopped" if ok else "other", "rc": job.returncode,
            "steps": stopped}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="prepared char data")
    p.add_argument("--out", required=True, type=Path, help="folder for logs, stacks and trials.jsonl")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--hang-after", type=float, default=150.0,
                   help="seconds after the signal before a trial counts as hung")
    p.add_argument("--load", type=int, default=0, help="busy processes beside every trial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay", type=float, default=4.0,
                   help="the signal comes 0 to this many seconds after the first train record")
    p.add_argument("--log-every", type=int, nargs="+", default=[1, 5, 50],
                   help="--log-every values drawn at random per trial")
    p.add_argument("--no-signal", type=int, metavar="STEPS", default=0,
                   help="send no signal: each trial trains this many steps and should finish "
                        "(the old deadlock showed so at --log-every 200 and 600 steps)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    counts: Counter = Counter()
    try:
        with open(args.out / "trials.jsonl", "a") as record:
            for i in range(args.trials):
                run = args.out / f"t{i}"
                log_every = rng.choice(args.log_every)
                if args.no_signal:
                    result = unsignalled(run, args.data, log_every, args.no_signal, args.hang_after)
                else:
                    result = trial(run, args.data, rng.uniform(0.0, args.max_delay), log_every,
                                   args.hang_after)
                result = {"trial": i, "load": args.load, **result}
                record.write(json.dumps(result) + "\n")
                record.flush()
                counts[result["end"]] += 1
                print(json.dumps(result), flush=True)
                if result["end"] in ("stopped", "finished"):  # keep the logs and stacks of the rest
                    shutil.rmtree(run, ignore_errors=True)
                    (args.out / f"t{i}.log").unlink()
    finally:
        for b in busy:
            b.kill()
    print(f"{args.trials} trials, load {args.load}: {dict(counts)}")


if __name__ == "__main__":
    main()
