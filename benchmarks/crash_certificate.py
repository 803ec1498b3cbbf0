"""The crash certificate: kill -9 a saving or promoting process at random instants and at every crash
point, and after every kill check that nothing acknowledged was lost.

    PYTHONPATH=. python benchmarks/crash_certificate.py --trials N [--scenario NAME ...] [--seed S] [--jobs J] [--json PATH]

``--trials`` is per scenario: half of them kill at crash points, half at random instants.

Every trial starts from a copy of the scenario's template (a few checkpoints, or a registry with
two validated versions and one in production) and forks a worker from a zygote: a forkserver
process that imported torch, ckpt_plugin and s3fs once and never runs anything, so each worker is a
fresh interpreter in all but the import time. The worker runs seeded operations (saves, or
validations, promotions and rollbacks), appending an fsynced acknowledgement after each returns.

- **Random instants**: the parent SIGKILLs the worker at a random point of one of its first few
  operations: after a random number of acknowledgements, a random fraction of an operation's time
  later (the time the previous operation took, or the dry run's first one).
- **Crash points**: a dry run of a fixed plan counts every call that changes the store (see
  ``crashcert/crash_points.py``); trial ``k`` kills the worker right before or right after call
  ``k``, so the trials together reach every crash point of the plan (in a seeded order), then
  those of the next plan.

After every kill a checker, forked from the zygote too, opens the store as the next run would and
checks the invariants (``crashcert/checks.py``); see ``docs/guarantees.md``. S3 scenarios run
against a moto server in this process, reached by the workers through a TCP proxy that resets and
stalls connections (``tests/tcp_proxy.py``), and by the checkers directly.

Prints the CPU model and load average, then a table per scenario: trials, kills at random
instants, kills at crash points, crash points reached, violations and time per trial, and the
first violations. The exit status is 1 when any invariant was violated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from _args import number_between, whole_number  # noqa: E402
from _common import machine  # noqa: E402
from crashcert import checks, worker  # noqa: E402
from crashcert.crash_points import points_of  # noqa: E402
from crashcert.scenarios import SCENARIOS, Scenario  # noqa: E402

PLAN_OPS = 3
"""Operations of a crash-point plan."""
RANDOM_OPS = 100
"""Operations handed to a worker that is killed at a random instant: more than it reaches."""
RANDOM_SPAN_OPS = 3
"""Random kills fall within one of this many first operations."""
READY_TIMEOUT = 120.0
WORKER_TIMEOUT = 120.0
CHECK_TIMEOUT = 300.0
KEEP_VIOLATING = 20
"""Directories of violating trials kept for inspection."""
SHOWN_VIOLATIONS = 5


@dataclass
class Trial:
    scenario: str
    name: str
    """``crash-<n>`` or ``random-<n>``: with the seed, all it takes to run the trial again (``--only``)."""
    ops: list[list[Any]]
    crash: list[Any] | None = None
    kill: tuple[int, float] | None = None
    """For a kill at a random instant: after how many acknowledgements, and how far into the next
    operation (a fraction of the time an operation takes)."""


@dataclass
class Outcome:
    scenario: str
    name: str
    kind: str
    ended: str
    """``killed``, ``finished``, ``failed`` (an operation raised a CheckpointError), ``error`` or ``hung``."""
    acknowledged: int
    interrupted: list[Any] | None
    crash_point: str | None
    kill: tuple[int, float] | None
    killed_after: float | None
    """Seconds from the worker's start of work to a kill at a random instant."""
    seconds: float
    violations: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    kept: str | None = None


class Zygote:
    """A forkserver that imported everything once; workers and checkers are forked from it."""

    def __init__(self, remote: bool) -> None:
        self.context = multiprocessing.get_context("forkserver")
        preload = ["__main__", "torch", "ckpt_plugin", "ckpt_plugin.registry", "core_helpers",
                   "crashcert.worker", "crashcert.checks"]
        if remote:
            preload += ["s3fs", "boto3", "ckpt_plugin._storage.fsspec"]
        self.context.set_forkserver_preload(preload)

    def run(self, target: Any, spec: dict[str, Any]) -> tuple[Any, Any]:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=target, args=(spec, send), daemon=True)
        process.start()
        send.close()
        return process, receive


class Certificate:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed: int = args.seed
        self.scratch = Path(tempfile.mkdtemp(prefix="ckpt-crash-", dir=args.dir))
        self.remote = any(SCENARIOS[name].remote for name in args.scenario)
        self.s3 = None
        if self.remote:
            from crashcert.s3 import S3Harness

            os.environ.update(AWS_ACCESS_KEY_ID="certificate", AWS_SECRET_ACCESS_KEY="certificate",
                              AWS_DEFAULT_REGION="us-east-1")
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
                os.environ.pop(name, None)
            self.s3 = S3Harness(reset_probability=args.reset_probability, stall_probability=args.stall_probability,
                                stall_seconds=args.stall_seconds, seed=args.seed)
        self.zygote = Zygote(self.remote)
        self.kept = 0
        self.first_op: dict[str, float] = {}
        """Seconds a scenario's first operation takes (in its first dry run): the time of an operation
        for a random kill before any acknowledgement."""
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ places

    def location(self, scenario: Scenario, trial: str) -> str:
        if scenario.remote:
            assert self.s3 is not None
            return self.s3.url(f"{scenario.name}/{trial}/checkpoints")
        return str(self.scratch / scenario.name / trial / "run" / "checkpoints")

    def prepare(self, scenario: Scenario, trial: str) -> Path:
        """A fresh copy of the template for ``trial``; returns the trial's own directory (logs)."""
        directory = self.scratch / scenario.name / trial
        directory.mkdir(parents=True)
        if scenario.remote:
            assert self.s3 is not None
            self.s3.copy_prefix(f"{scenario.name}/template", f"{scenario.name}/{trial}")
        else:
            shutil.copytree(self.scratch / scenario.name / "template" / "run", directory / "run", symlinks=True)
        return directory

    def discard(self, scenario: Scenario, trial: str) -> None:
        shutil.rmtree(self.scratch / scenario.name / trial, ignore_errors=True)
        if scenario.remote:
            assert self.s3 is not None
            self.s3.remove_prefix(f"{scenario.name}/{trial}")

    def endpoint(self, scenario: Scenario, *, faulty: bool) -> str | None:
        if not scenario.remote:
            return None
        assert self.s3 is not None
        return self.s3.proxy_endpoint if faulty else self.s3.endpoint

    # ------------------------------------------------------------------ one run of a worker

    def work(self, scenario: Scenario, trial: str, directory: Path, ops: list[list[Any]], *, crash: list[Any] | None = None,
             kill: tuple[int, float] | None = None, first_op: float = 0.1, faulty: bool = True) -> dict[str, Any]:
        """Run a worker over the trial's copy; with ``kill``, SIGKILL it at that random instant
        (``first_op``: how long a first operation takes, when none was acknowledged yet)."""
        spec = {
            "scenario": scenario.name, "location": self.location(scenario, trial), "endpoint": self.endpoint(scenario, faulty=faulty),
            "ops": ops, "crash": crash, "log": str(directory / "acks.log"), "uploads": str(directory / "uploads.log"),
            "output": str(directory / "worker.log"), "cwd": str(directory),
        }
        process, conn = self.zygote.run(worker.run, spec)
        run: dict[str, Any] = {"counts": None, "elapsed": None, "raised": None, "hung": False, "killed_after": None}
        try:
            ready = conn.poll(READY_TIMEOUT) and conn.recv() == ["ready"]
        except EOFError:
            ready = False
        if ready and kill is not None:
            self.kill_at(process, conn, kill, first_op, run)
        process.join(WORKER_TIMEOUT)
        if process.is_alive():
            run["hung"] = True
            os.kill(process.pid, signal.SIGUSR1)  # its threads' stacks, into worker.log
            time.sleep(1)
            os.kill(process.pid, signal.SIGUSR2)  # its requests' stacks, too
            time.sleep(3)
            process.kill()
            process.join(30)
        try:
            while conn.poll(0):
                self.receive(conn.recv(), run)
        except EOFError:
            pass
        conn.close()
        run["exitcode"] = process.exitcode
        run["ready"] = ready
        run.update(read_log(directory / "acks.log"))
        return run

    @staticmethod
    def receive(message: list[Any], run: dict[str, Any]) -> None:
        if message[0] == "done":
            run["counts"], run["elapsed"], run["raised"] = message[1], message[2], message[3]

    def kill_at(self, process: Any, conn: Any, kill: tuple[int, float], first_op: float, run: dict[str, Any]) -> None:
        """Wait for ``kill[0]`` acknowledgements, then ``kill[1]`` of the last operation's time, and kill."""
        acknowledgements, fraction = kill
        started = last = time.perf_counter()
        operation = first_op
        seen = 0
        try:
            while seen < acknowledgements:
                if not conn.poll(WORKER_TIMEOUT):
                    return  # hung: the caller's join times out too
                message = conn.recv()
                if message[0] == "ack":
                    seen += 1
                    now = time.perf_counter()
                    operation, last = now - last, now
                else:
                    self.receive(message, run)
                    return  # it ended on its own (an operation failed)
        except EOFError:
            return
        time.sleep(fraction * operation)
        run["killed_after"] = time.perf_counter() - started
        process.kill()

    def check(self, scenario: Scenario, trial: str, directory: Path, extra: dict[str, Any]) -> dict[str, Any]:
        spec = {
            "scenario": scenario.name, "location": self.location(scenario, trial), "endpoint": self.endpoint(scenario, faulty=False),
            "output": str(directory / "check.log"), "cwd": str(directory), "uploads": str(directory / "uploads.log"),
            **extra,
        }
        if scenario.remote:
            from crashcert.s3 import BUCKET

            spec.update(bucket=BUCKET, prefix=f"{scenario.name}/{trial}/")
        process, conn = self.zygote.run(checks.run, spec)
        report = None
        try:
            if conn.poll(CHECK_TIMEOUT):
                report = conn.recv()
        except EOFError:
            pass
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join(30)
        conn.close()
        if report is None:
            return {"violations": [f"the checker ended without a report (exit code {process.exitcode}); see {directory}/check.log"],
                    "facts": {}}
        return report

    # ------------------------------------------------------------------ a trial

    def run_trial(self, trial: Trial) -> Outcome:
        scenario = SCENARIOS[trial.scenario]
        started = time.perf_counter()
        directory = self.prepare(scenario, trial.name)
        prepared = time.perf_counter()
        run = self.work(scenario, trial.name, directory, trial.ops, crash=trial.crash, kill=trial.kill,
                        first_op=self.first_op[trial.scenario])
        worked = time.perf_counter()
        outcome = self.judge(scenario, trial, directory, run)
        outcome.seconds = time.perf_counter() - started
        outcome.facts["seconds"] = {"prepare": prepared - started, "work": worked - prepared, "check": outcome.seconds - (worked - started)}
        return outcome

    def judge(self, scenario: Scenario, trial: Trial, directory: Path, run: dict[str, Any]) -> Outcome:
        """What the worker's log says happened, the models before and after the one operation whose
        outcome is unknown, and the checker's verdict against them."""
        violations: list[str] = []
        acked = run["acks"]
        if sorted(acked) != list(range(len(acked))):
            violations.append(f"acknowledgements out of order: {sorted(acked)}")
        count = len(acked)
        # multiprocessing reports 255 when the forkserver's report of a child's exit never arrived;
        # a worker that was killed (by us, or by itself at its crash point) and never said "done"
        # was killed, and its store is checked like any other's.
        status_lost = run["exitcode"] == 255 and run["counts"] is None and (
            run["killed_after"] is not None or trial.crash is not None)
        killed = (run["exitcode"] == -9 or status_lost) and not run["hung"]
        if run["hung"]:
            ended = "hung"
            violations.append(f"the worker hung for {WORKER_TIMEOUT:.0f} s (its stacks are in {directory}/worker.log)")
        elif not run["ready"]:
            ended = "error"
            violations.append(f"the worker did not start (exit code {run['exitcode']}; see {directory}/worker.log)")
        elif run["error"] is not None:
            ended = "error"
            violations.append(f"operation {run['error'][0]} {trial.ops[run['error'][0]]} raised a non-CheckpointError: {run['error'][1]}")
        elif killed:
            ended = "killed"
        elif run["fail"] is not None:
            ended = "failed"
            if not scenario.remote:  # nothing is injected locally: a failed operation is a bug
                violations.append(f"operation {run['fail'][0]} {trial.ops[run['fail'][0]]} failed: {run['fail'][1]}")
        elif run["exitcode"] == 0 and count == len(trial.ops):
            ended = "finished"
        else:
            ended = "error"
            violations.append(f"the worker stopped after {count} operations with exit code {run['exitcode']} (see {directory}/worker.log)")
        interrupted = trial.ops[count] if ended != "finished" and count < len(trial.ops) else None

        model = scenario.template_model(self.seed)
        for index, op in enumerate(trial.ops[:count]):
            model.apply(op)
            problem = disagreement(scenario, model, acked.get(index))
            if problem:
                violations.append(f"operation {index} {op} returned {acked.get(index)}, but {problem}")
        before = model.copy()
        after = None
        if interrupted is not None:
            after = model.copy()
            after.apply(interrupted)
        extra = {"before": before.to_json(), "after": after.to_json() if after is not None else None,
                 "interrupted": interrupted, "killed": killed}
        if scenario.kind == "checkpoints":
            extra.update(saves_written(scenario, self.seed, trial.ops[: count + (interrupted is not None)], count))
        report = self.check(scenario, trial.name, directory, extra)
        violations.extend(report["violations"])
        kind = "crash" if trial.crash is not None else "random" if trial.kill is not None else "dry-run"
        outcome = Outcome(trial.scenario, trial.name, kind, ended, count, interrupted, run["crash"], trial.kill,
                          run["killed_after"], 0.0, violations, {**report["facts"], "exit_status_lost": status_lost})
        with self._lock:
            keep = self.args.keep or (violations and self.kept < KEEP_VIOLATING)
            self.kept += bool(violations and not self.args.keep)
        if keep:
            outcome.kept = str(directory)
        else:
            self.discard(scenario, trial.name)
        return outcome

    # ------------------------------------------------------------------ a scenario

    def build_template(self, scenario: Scenario) -> None:
        directory = self.scratch / scenario.name / "template"
        directory.mkdir(parents=True)
        run = self.work(scenario, "template", directory, scenario.template_ops(self.seed), faulty=False)
        if run["exitcode"] != 0 or len(run["acks"]) != len(scenario.template_ops(self.seed)):
            raise SystemExit(f"building the template of {scenario.name} failed: {run}; see {directory}/worker.log")

    def dry_run(self, scenario: Scenario, variant: int) -> tuple[list[list[Any]], dict[str, Any], Outcome]:
        """Run plan ``variant`` without a kill: its operations, what it made (its crash points, its
        calls per group, its time and its first operation's), and its check."""
        name = f"plan-{variant}"
        ops = scenario.plan(self.seed, name, PLAN_OPS)
        trial = Trial(scenario.name, name, ops)
        started = time.perf_counter()
        directory = self.prepare(scenario, name)
        run = self.work(scenario, name, directory, ops, faulty=False)
        outcome = self.judge(scenario, trial, directory, run)
        outcome.seconds = time.perf_counter() - started
        if run["counts"] is None or len(run["acks"]) != len(ops):
            raise SystemExit(f"the dry run of {scenario.name} plan {variant} did not finish: {outcome}")
        made = {"plan": variant, "calls": run["counts"], "points": points_of(run["counts"], run["raised"]),
                "seconds": run["elapsed"], "first_op": run["acks"][0]["at"]}
        return ops, made, outcome

    def trials(self, scenario: Scenario, total: int) -> tuple[list[Trial], dict[str, Any], list[Outcome]]:
        """The trials of ``scenario``: half at crash points (plan by plan, each plan's points in a
        seeded order), half at random instants. Also what the dry runs found."""
        crash_count = total // 2
        plans: list[dict[str, Any]] = []
        baseline: list[Outcome] = []
        crash_trials: list[Trial] = []
        wanted = set(self.args.only) if self.args.only else None
        variant = 0
        while len(crash_trials) < crash_count or not plans:
            ops, made, outcome = self.dry_run(scenario, variant)
            baseline.append(outcome)
            points = made.pop("points")
            random.Random(f"{self.seed}/{scenario.name}/points/{variant}").shuffle(points)
            plans.append({**made, "points": len(points)})
            for point in points[: crash_count - len(crash_trials)]:
                name = f"crash-{len(crash_trials)}"
                crash_trials.append(Trial(scenario.name, name, ops, crash=point))
            variant += 1
        self.first_op[scenario.name] = plans[0]["first_op"]
        random_trials = []
        for number in range(total - crash_count):
            rng = random.Random(f"{self.seed}/{scenario.name}/kill/{number}")
            name = f"random-{number}"
            random_trials.append(Trial(scenario.name, name, scenario.plan(self.seed, name, RANDOM_OPS),
                                       kill=(rng.randrange(RANDOM_SPAN_OPS), rng.random())))
        chosen = [t for t in crash_trials + random_trials if wanted is None or t.name in wanted]
        return chosen, {"plans": plans, "seconds_per_op": plans[0]["seconds"] / PLAN_OPS}, baseline

    def run_scenario(self, name: str) -> dict[str, Any]:
        scenario = SCENARIOS[name]
        started = time.perf_counter()
        self.build_template(scenario)
        trials, plans, baseline = self.trials(scenario, self.args.trials)
        setup = time.perf_counter() - started
        print(f"{name}: {len(trials)} trials; plans of {PLAN_OPS} operations make "
              + ", ".join(f"{sum(p['calls'].values())} calls ({p['points']} crash points)" for p in plans["plans"])
              + f"; one operation takes {plans['seconds_per_op'] * 1000:.0f} ms; setup {setup:.1f} s", flush=True)
        outcomes: list[Outcome] = []
        progress = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.args.jobs, thread_name_prefix="lane") as lanes:
            for outcome in lanes.map(self.run_trial, trials):
                outcomes.append(outcome)
                if outcome.violations:
                    print(f"  VIOLATION {describe(outcome, self.seed)}: {outcome.violations[0]}", flush=True)
                if time.perf_counter() - progress > 60:
                    progress = time.perf_counter()
                    print(f"  {len(outcomes)}/{len(trials)} trials, {sum(bool(o.violations) for o in outcomes)} with violations",
                          flush=True)
        elapsed = time.perf_counter() - started
        return summarize(name, outcomes, baseline, plans, elapsed, setup, self.seed)

    def close(self) -> None:
        if self.s3 is not None:
            self.s3.close()
        if not self.kept and not self.args.keep:
            shutil.rmtree(self.scratch, ignore_errors=True)


def read_log(path: Path) -> dict[str, Any]:
    """The acknowledgements (``{index: result}``), the failure or error, and the crash point of a worker's log."""
    found: dict[str, Any] = {"acks": {}, "fail": None, "error": None, "crash": None}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return found
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "ack":
            index, _, result = rest.partition(" ")
            found["acks"][int(index)] = json.loads(result)
        elif kind in ("fail", "error"):
            index, _, detail = rest.partition(" ")
            found[kind] = (int(index), detail)
        elif kind == "crash":
            found["crash"] = rest
    return found


def disagreement(scenario: Scenario, model: Any, result: dict[str, Any] | None) -> str | None:
    """Why an operation's returned result disagrees with the model after it, or None."""
    if scenario.kind != "registry" or result is None or "production" not in result:
        return None
    if (result["production"], result["stack"]) != (model.production, model.stack):
        return f"the model has production {model.production} with previous versions {model.stack}"
    return None


def saves_written(scenario: Scenario, seed: int, ops: list[list[Any]], acknowledged: int) -> dict[str, Any]:
    """Which versions each epoch was ever given, every version's loss, and the acknowledged versions
    (the template's and the operations' up to ``acknowledged``)."""
    template = scenario.template_ops(seed)
    written: dict[str, list[int]] = {}
    losses: dict[str, float] = {}
    for _, epoch, version, loss in template + ops:
        written.setdefault(str(epoch), []).append(version)
        losses[str(version)] = loss
    return {"written": written, "losses": losses,
            "acknowledged": [op[2] for op in template] + [op[2] for op in ops[:acknowledged]]}


def took_effect(outcome: Outcome) -> bool:
    """Whether the operation the kill interrupted had taken effect (a save committed, a change made)."""
    op = outcome.interrupted
    if not op:
        return False
    if op[0] == "save":
        return outcome.facts.get("listed", {}).get(str(op[1])) == op[2]
    return bool(outcome.facts.get("changed"))


def describe(outcome: Outcome, seed: int) -> str:
    if outcome.crash_point:
        where = f"crash point {outcome.crash_point}"
    elif outcome.killed_after is not None and outcome.kill is not None:
        where = (f"random kill {outcome.killed_after * 1000:.0f} ms after the start, {outcome.kill[1]:.2f} of an "
                 f"operation after {outcome.kill[0]} acknowledgements")
    else:
        where = outcome.ended
    return (f"{outcome.scenario} seed {seed} {outcome.name} ({where}; {outcome.acknowledged} acknowledged, "
            f"interrupted {outcome.interrupted})")


def summarize(name: str, outcomes: list[Outcome], baseline: list[Outcome], plans: dict[str, Any], elapsed: float,
              setup: float, seed: int) -> dict[str, Any]:
    seconds = [o.seconds for o in outcomes]
    crash_kills = [o for o in outcomes if o.kind == "crash" and o.ended == "killed"]
    violating = [o for o in baseline + outcomes if o.violations]
    return {
        "scenario": name,
        "description": SCENARIOS[name].description,
        "trials": len(outcomes),
        "random_kills": sum(o.kind == "random" and o.ended == "killed" for o in outcomes),
        "crash_point_kills": len(crash_kills),
        "crash_points": sum(p["points"] for p in plans["plans"]),
        "plans": plans["plans"],
        "not_killed": {state: sum(o.ended == state for o in outcomes) for state in ("finished", "failed", "error", "hung")},
        "interrupted_operation_took_effect": sum(took_effect(o) for o in outcomes),
        "kills_whose_exit_status_was_lost": sum(bool(o.facts.get("exit_status_lost")) for o in outcomes),
        "uploads_cut_off_by_the_kill": sum(o.facts.get("uploads_cut_off_by_the_kill", 0) for o in outcomes),
        "violating_trials": len(violating),
        "violations": [{"trial": describe(o, seed), "kept": o.kept, "violations": o.violations} for o in violating],
        "seconds_per_trial_median": statistics.median(seconds) if seconds else None,
        "work_seconds_median": statistics.median(o.facts["seconds"]["work"] for o in outcomes) if outcomes else None,
        "check_seconds_median": statistics.median(o.facts["seconds"]["check"] for o in outcomes) if outcomes else None,
        "seconds_per_trial_mean": statistics.fmean(seconds) if seconds else None,
        "seconds": elapsed,
        "setup_seconds": setup,
        "outcomes": [asdict(o) for o in outcomes],
    }


def print_table(results: list[dict[str, Any]], total: float, jobs: int) -> None:
    columns = [("scenario", 12, "scenario", "{:<12}"), ("trials", 6, "trials", "{:>6}"),
               ("random kills", 12, "random_kills", "{:>12}"), ("crash-point kills", 17, "crash_point_kills", "{:>17}"),
               ("points", 6, "crash_points", "{:>6}"), ("took effect", 11, "interrupted_operation_took_effect", "{:>11}"),
               ("violations", 10, "violating_trials", "{:>10}"), ("s/trial", 7, "seconds_per_trial_median", "{:>7.2f}"),
               ("work", 5, "work_seconds_median", "{:>5.2f}"), ("check", 5, "check_seconds_median", "{:>5.2f}"),
               ("time", 7, "seconds", "{:>6.0f}s")]
    print("\n" + " ".join(title.rjust(width) if index else title.ljust(width) for index, (title, width, _, _) in enumerate(columns)))
    for r in results:
        print(" ".join(form.format(r[key] if r[key] is not None else 0) for _, _, key, form in columns))
    trials = sum(r["trials"] for r in results)
    sums = {key: sum(r[key] for r in results) for key in ("trials", "random_kills", "crash_point_kills", "crash_points",
                                                           "interrupted_operation_took_effect", "violating_trials")}
    print(" ".join(["total".ljust(12)] + [form.format(sums[key]) for _, _, key, form in columns[1:7]]
                   + [f"{total / max(trials, 1) * jobs:>7.2f}", " " * 5, " " * 5, f"{total:>6.0f}s"]))
    print(f"points: crash points of the plans dry-run. took effect: kills after which the interrupted operation had\n"
          f"taken effect (a save committed, a change made). s/trial, work, check: median seconds of one trial, of its\n"
          f"worker and of its check, on one of {jobs} lane(s); the total row's s/trial is wall time x lanes / trials.")
    for r in results:
        if r.get("kills_whose_exit_status_was_lost"):
            print(f"{r['scenario']}: {r['kills_whose_exit_status_was_lost']} kills whose exit status multiprocessing lost "
                  "(reported as 255); counted as kills, their stores checked like every other")
        ended = {state: count for state, count in r["not_killed"].items() if count}
        if ended:
            print(f"{r['scenario']}: trials that ended without a kill: {ended}")
    for r in results:
        for v in r["violations"][:SHOWN_VIOLATIONS]:
            print(f"\n{v['trial']}" + (f" [kept in {v['kept']}]" if v["kept"] else ""))
            for line in v["violations"][:SHOWN_VIOLATIONS]:
                print(f"  - {line}")
        hidden = len(r["violations"]) - SHOWN_VIOLATIONS
        if hidden > 0:
            print(f"\n... and {hidden} more violating trials of {r['scenario']} (see --json)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=whole_number(2), default=30, help="trials per scenario (half at crash points, half at random instants)")
    parser.add_argument("--scenario", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS),
                        help="scenarios to run (default: all)")
    parser.add_argument("--seed", type=whole_number(0), default=0)
    parser.add_argument("--jobs", type=whole_number(1), default=1, help="trials run at once")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--dir", help="parent of the scratch directory (default: the system temp directory)")
    parser.add_argument("--keep", action="store_true", help="keep every trial's directory (violating ones are kept anyway)")
    parser.add_argument("--only", nargs="+", help="run only these trials (such as crash-12 random-3), to reproduce one")
    parser.add_argument("--reset-probability", type=number_between(0.0, 1.0), default=0.01, help="per forwarded chunk, S3 scenarios")
    parser.add_argument("--stall-probability", type=number_between(0.0, 1.0), default=0.01, help="per forwarded chunk, S3 scenarios")
    parser.add_argument("--stall-seconds", type=number_between(0.0), default=0.2)
    args = parser.parse_args()
    print(machine(), flush=True)
    print(f"seed {args.seed}, {args.trials} trials per scenario, {args.jobs} at once; scenarios: {' '.join(args.scenario)}",
          flush=True)
    started = time.perf_counter()
    certificate = Certificate(args)
    results = []
    try:
        for name in args.scenario:
            results.append(certificate.run_scenario(name))
            if args.json is not None:  # a run stopped later keeps the scenarios it finished
                args.json.write_text(json.dumps({"machine": machine(), "seed": args.seed, "jobs": args.jobs,
                                                 "trials_per_scenario": args.trials, "partial": True,
                                                 "scenarios": results}, indent=1, default=str))
    finally:
        faults = certificate.s3.faults() if certificate.s3 is not None else None
        certificate.close()
    total = time.perf_counter() - started
    print_table(results, total, args.jobs)
    if faults is not None:
        print(f"\nS3 proxy: {faults['connections']} connections, {faults['resets']} reset, {faults['stalls']} stalled "
              f"({args.stall_seconds} s each)")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "seed": args.seed, "jobs": args.jobs,
                                         "trials_per_scenario": args.trials, "seconds": total, "s3_proxy": faults,
                                         "scenarios": results}, indent=1, default=str))
    sys.exit(1 if any(r["violating_trials"] for r in results) else 0)


if __name__ == "__main__":
    main()
