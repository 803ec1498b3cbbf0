"""Time from process start to the first training step of a run resumed inside an epoch.

    PYTHONPATH=. python benchmarks/resume.py [--samples 200000] [--cost-ms 0.2] [--batch 256] [--dir DIR]

An iterable dataset of ``--samples`` samples costs ``--cost-ms`` of work per sample (decoding,
augmentation) and keeps its position as ``state_dict()``. For each of three ways to resume, one run
trains to 90% of the epoch (the per-sample cost off, since it changes nothing saved) and saves at
10%, 50% and 90%; then a new process resumes from each of them and reports when its first training
step begins, measured from just before the process was started:

* ``ours``: the Hugging Face ``Trainer`` with ``ckpt_plugin.hf.CheckpointCallback`` and a stateful
  loader (accelerate's ``use_stateful_dataloader``): the loader's position comes back, nothing is replayed;
* ``hf skip``: the ``Trainer``'s own checkpoints and resume, which replays the epoch's first batches;
* ``lightning``: Lightning's own ``ModelCheckpoint`` and ``fit(ckpt_path=...)`` with torchdata's
  ``StatefulDataLoader``, which Lightning restores.

Goals (issue 23): ours is flat (90% within 1.2x of 10%), and at 90% ours takes at most 0.05x the
Trainer's skip. Ratios are taken within one run, where the machine's load hits every way alike.
Each way is also started from scratch (no checkpoint), which times what no resume can avoid:
starting Python, importing the framework and building the trainer; the script prints what each
resume adds to that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _args import existing_dir, number_between, whole_number  # noqa: E402

POINTS = (0.1, 0.5, 0.9)
WAYS = ("ours", "hf skip", "lightning")


# ------------------------------------------------------------------ the child processes


def dataset(samples: int, cost_s: float):  # type: ignore[no-untyped-def]
    import torch

    class Costly(torch.utils.data.IterableDataset):
        def __init__(self) -> None:
            self.position = 0

        def __iter__(self):  # type: ignore[no-untyped-def]
            while self.position < samples:
                index = self.position
                self.position += 1
                end = time.perf_counter() + cost_s
                while time.perf_counter() < end:  # the per-sample work
                    pass
                yield {"x": torch.full((4,), float(index % 7)), "labels": torch.tensor(float(index % 2))}
            self.position = 0

        def state_dict(self) -> dict[str, int]:
            return {"position": self.position}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.position = state["position"]

    return Costly()


def first_step_reporter(report: Path | None):  # type: ignore[no-untyped-def]
    """A model whose first training forward writes the wall clock to ``report`` and ends the process."""
    import torch

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, labels=None):  # type: ignore[no-untyped-def]
            if report is not None:
                report.write_text(repr(time.time()))
                os._exit(0)
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}

    return Model()


def hf_child(way: str, options: dict, report: Path | None, resume: str | None) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ckpt_plugin.hf import CheckpointCallback

    saves = options["saves"]

    class StopAfterLastSave(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            control.should_save = state.global_step in saves
            control.should_training_stop = state.global_step >= max(saves)

    ours = way == "ours"
    args = TrainingArguments(
        output_dir=options["dir"], per_device_train_batch_size=options["batch"], max_steps=options["steps"],
        save_strategy="steps", save_steps=10**9, logging_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True,
    )
    callbacks = [StopAfterLastSave()] + ([CheckpointCallback(max_checkpoints=None)] if ours else [])
    cost = 0.0 if report is None else options["cost_s"]
    trainer = Trainer(model=first_step_reporter(report), args=args, train_dataset=dataset(options["samples"], cost),
                      callbacks=callbacks)
    trainer.accelerator.dataloader_config.use_stateful_dataloader = ours
    trainer.train(resume_from_checkpoint=resume)


def lightning_child(options: dict, report: Path | None, resume: str | None) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torchdata.stateful_dataloader import StatefulDataLoader

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = first_step_reporter(report)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            loss = self.model(**batch)["loss"]
            if self.trainer.global_step + 1 >= max(options["saves"]):
                self.trainer.should_stop = True
            return loss

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cost = 0.0 if report is None else options["cost_s"]
    loader = StatefulDataLoader(dataset(options["samples"], cost), batch_size=options["batch"])
    every = options["saves"][0]
    checkpoints = ModelCheckpoint(options["dir"], every_n_train_steps=every, save_top_k=-1, save_on_exception=False) \
        if "save_on_exception" in ModelCheckpoint.__init__.__code__.co_varnames \
        else ModelCheckpoint(options["dir"], every_n_train_steps=every, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoints], default_root_dir=options["dir"])
    trainer.fit(Module(), loader, ckpt_path=resume)


def child(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    way, options_json, report, resume = argv
    options = json.loads(options_json)
    report_path = Path(report) if report != "-" else None
    resume_path = resume if resume != "-" else None
    if way == "lightning":
        lightning_child(options, report_path, resume_path)
    else:
        hf_child(way, options, report_path, resume_path)


# ------------------------------------------------------------------ the parent


def run_child(way: str, options: dict, report: Path | None, resume: str | None) -> float:
    started = time.time()
    command = [sys.executable, __file__, "--child", way, json.dumps(options), str(report or "-"), resume or "-"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{way} run failed:\n{done.stderr[-3000:]}")
    return float(report.read_text()) - started if report is not None else 0.0


def checkpoint_paths(way: str, directory: Path, saves: list[int]) -> dict[int, str]:
    if way == "ours":
        from ckpt_plugin import CheckpointManager

        infos = {info.step: str(info.path) for info in CheckpointManager(directory, max_checkpoints=None).checkpoints()}
        return {step: infos[step] for step in saves}
    if way == "hf skip":
        return {step: str(directory / f"checkpoint-{step}") for step in saves}
    return {step: next(str(path) for path in directory.glob(f"*step={step}.ckpt")) for step in saves}


def measure(way: str, root: Path, args: argparse.Namespace, steps: int, saves: list[int]) -> dict[int, float]:
    """Train to the last point saving at each (no per-sample cost), then time a resume from each, and
    (under the key 0) a start from scratch: what starting the process and building the trainer cost."""
    directory = root / way.replace(" ", "-")
    options = {"dir": str(directory), "samples": args.samples, "batch": args.batch, "steps": steps,
               "saves": saves, "cost_s": args.cost_ms / 1000}
    run_child(way, options, None, None)
    paths = checkpoint_paths(way, directory, saves)
    times = {step: run_child(way, options, root / "first-step", paths[step]) for step in saves}
    times[0] = run_child(way, options, root / "first-step", None)
    return times


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=whole_number(1000), default=200_000)
    parser.add_argument("--cost-ms", type=number_between(0.0, 100.0), default=0.2)
    parser.add_argument("--batch", type=whole_number(1), default=256)
    parser.add_argument("--dir", type=existing_dir, default=None)
    args = parser.parse_args()
    from _common import machine, scratch_dir

    print(machine())
    root = scratch_dir(str(args.dir) if args.dir else None)
    steps = args.samples // args.batch
    # Lightning saves every n steps, so the points are multiples of the 10% step.
    tenth = max(round(steps * POINTS[0]), 1)
    saves = [tenth * round(point / POINTS[0]) for point in POINTS]
    try:
        times = {way: measure(way, root, args, steps, saves) for way in WAYS}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.samples} samples of {args.cost_ms} ms, batch {args.batch}: seconds from process start to the "
          f"first step after a resume at {', '.join(f'{point:.0%}' for point in POINTS)} of the epoch")
    for way in WAYS:
        print(f"  {way:<10} " + "  ".join(f"{times[way][step]:8.2f}" for step in saves)
              + f"   (from scratch: {times[way][0]:.2f})")
    ours = times["ours"]
    own = {way: {step: times[way][step] - times[way][0] for step in saves} for way in WAYS}
    print("\nwhat the resume itself adds to a start from scratch (process start, imports, building the trainer):")
    for way in WAYS:
        print(f"  {way:<10} " + "  ".join(f"{own[way][step]:8.2f}" for step in saves))
    print(f"\n  ours, 90% / 10%                 {ours[saves[-1]] / ours[saves[0]]:6.2f}x   goal <= 1.2")
    print(f"  ours / hf skip, at 90%          {ours[saves[-1]] / times['hf skip'][saves[-1]]:6.3f}x  goal <= 0.05")
    print(f"  ours / lightning, at 90%        {ours[saves[-1]] / times['lightning'][saves[-1]]:6.2f}x")
    print(f"  resume's own time, ours / hf skip, at 90%: {own['ours'][saves[-1]]:.2f} s / {own['hf skip'][saves[-1]]:.2f} s")
    print(f"  load average after the run: {os.getloadavg()}")


if __name__ == "__main__":
    main()
