"""Hugging Face Trainer with ckpt_plugin: a tiny GPT-2 trains, is killed, resumes and ends with the best model.

    HF_HUB_OFFLINE=1 python examples/hf_train.py [--dir DIR] [--epochs 6] [--interrupt-after 3] [--async-save]

1. A child process trains a GPT-2 built from a config (nothing is downloaded) on synthetic token
   sequences, with ``CheckpointCallback`` taking its settings from the ``TrainingArguments``. It is
   killed with SIGKILL at the start of epoch ``--interrupt-after + 1``, the way a preempted job dies.
   With ``--async-save`` checkpoints are written in the background, so the kill may catch the last
   one before it committed; the run then resumes from the one before.
2. This process builds a fresh model and Trainer and calls ``trainer.train(resume_from_checkpoint=True)``.
3. It checks that the result is bitwise identical to an uninterrupted run, that the model holds the
   best checkpoint's weights (``load_best_model_at_end``), and that no pickle is on disk.
4. It validates the best checkpoint, promotes it to production, and predicts the next tokens of a
   sequence with the production model.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from ckpt_plugin import ArtifactRegistry  # noqa: E402
from ckpt_plugin.hf import CheckpointCallback  # noqa: E402

VOCAB = 64


class CountingSequences(torch.utils.data.Dataset):
    """Token sequences that count up from a random start by a random stride (mod VOCAB): learnable."""

    def __init__(self, count: int, length: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (count, 1), generator=generator)
        stride = torch.randint(1, 4, (count, 1), generator=generator)
        self.ids = (start + stride * torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class KillAtEpoch(TrainerCallback):
    """Kills the process when epoch ``epoch`` begins, after the previous epoch was checkpointed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        if state.epoch >= self.epoch:
            print(f"simulating a crash at the start of epoch {self.epoch + 1}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def build_trainer(
    output_dir: Path, epochs: int, seed: int = 0, interrupt_after: int | None = None, async_save: bool = False
) -> tuple[Trainer, CheckpointCallback]:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64))
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=2,
        metric_for_best_model="loss",
        greater_is_better=False,
        load_best_model_at_end=True,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=42,
    )
    # output_dir, save_total_limit, metric and best-model settings come from args
    callback = CheckpointCallback(async_save=async_save)
    callbacks = [callback] + ([KillAtEpoch(interrupt_after)] if interrupt_after is not None else [])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=CountingSequences(96, 32, seed=1),
        eval_dataset=CountingSequences(32, 32, seed=2),
        callbacks=callbacks,
    )
    return trainer, callback


def pickles_under(root: Path) -> list[Path]:
    """Files that are pickles or torch.save archives (what the Trainer's own checkpoints hold)."""
    return [
        path
        for path in root.rglob("*")
        if path.is_file()
        and (
            path.suffix in {".pt", ".pth", ".bin"}
            or path.read_bytes()[:4] in (b"PK\x03\x04",)
            or path.read_bytes()[:1] == b"\x80"
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="output_dir (default: a new temporary directory)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--interrupt-after", type=int, default=3)
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny model: one thread is fastest
    output_dir = options.dir or Path(tempfile.mkdtemp(prefix="ckpt_hf_")) / "out"
    if options.child:
        build_trainer(
            output_dir, options.epochs, interrupt_after=options.interrupt_after, async_save=options.async_save
        )[0].train()
        return

    print(f"== 1. training in a child process that is killed after epoch {options.interrupt_after}")
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "--dir",
            str(output_dir),
            "--epochs",
            str(options.epochs),
            "--interrupt-after",
            str(options.interrupt_after),
            *(["--async-save"] if options.async_save else []),
        ],
        check=False,
    )
    print(f"child exited with status {child.returncode}; on disk: {', '.join(sorted(os.listdir(output_dir)))}")

    print("== 2. resuming in this process with trainer.train(resume_from_checkpoint=True)")
    # other initial weights on purpose: all must come from the checkpoint
    trainer, callback = build_trainer(output_dir, options.epochs, seed=123, async_save=options.async_save)
    trainer.train(resume_from_checkpoint=True)

    print("== 3. checking the result")
    reference_trainer, _ = build_trainer(output_dir.parent / "uninterrupted", options.epochs)
    reference_trainer.train()
    manager = callback.manager
    best = manager.best()
    best_weights = manager.load_best()["model"]
    weights = trainer.model.state_dict()
    holds_best = all(torch.equal(weights[name], tensor) for name, tensor in best_weights.items())
    reference = reference_trainer.model.state_dict()
    identical = all(torch.equal(weights[name], reference[name]) for name in reference)
    print(f"best checkpoint: {best.name} (eval_loss {best.metrics['eval_loss']:.4f}); the model holds it: {holds_best}")
    print(f"bitwise identical to an uninterrupted run: {identical}")
    tied = trainer.model.lm_head.weight is trainer.model.transformer.wte.weight
    print(f"lm_head still tied to the token embedding: {tied}")
    pretrained = AutoModelForCausalLM.from_pretrained(best.path).state_dict()  # the HF way, no ckpt_plugin involved
    loads = all(torch.equal(pretrained[name], tensor) for name, tensor in best_weights.items())
    print(f"AutoModelForCausalLM.from_pretrained({best.name}) gives the best weights: {loads}")
    pickles = pickles_under(output_dir)
    print(f"pickle files in {output_dir}: {len(pickles)}")
    print(f"== on disk in {output_dir}")
    for name in sorted(os.listdir(output_dir)):
        path = output_dir / name
        if path.is_symlink():
            print(f"  {name:<18} -> {os.readlink(path)}   (what resume_from_checkpoint=True finds)")
    for info in manager.checkpoints():
        files = ", ".join(sorted(info.files))
        print(f"  {info.name:<18} eval_loss={info.metrics['eval_loss']:.4f}  {info.size / 1024:7.1f} KiB  {files}")
    if not (holds_best and identical and loads and not pickles):
        sys.exit("the run did not end as expected")

    print("== 4. validating the best checkpoint, promoting it, and predicting with the production model")
    promote_and_predict(output_dir)


def promote_and_predict(output_dir: Path) -> None:
    """Gate the best checkpoint, give it the next minor version, promote it, and serve a prediction."""
    uniform = math.log(VOCAB)  # the loss of guessing every token uniformly
    registry = ArtifactRegistry(checkpoint_dir=output_dir)
    record = registry.validate(
        epoch="best",
        bump="minor",
        checks={
            f"eval_loss beats a uniform guess ({uniform:.2f})": lambda ckpt: ckpt["metrics"]["eval_loss"] < uniform,
            "weights are finite": lambda ckpt: all(t.isfinite().all() for t in ckpt["model"].values()),
        },
    )
    print(f"validated {record['source']['name']} as version {record['version']}: "
          + ", ".join(f"{check['name']} ({'passed' if check['passed'] else 'failed'})" for check in record["checks"]))
    registry.promote(record["version"])
    served = registry.load_production()
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64))
    model.load_state_dict(served["model"])
    model.eval()
    prompt = torch.tensor([[5, 7, 9, 11, 13, 15]])
    with torch.no_grad():
        predicted = model(prompt).logits[0, -1].argmax().item()
    print(f"production is version {served['version']}; after {prompt[0].tolist()} it predicts {predicted} (the rule gives 17)")


if __name__ == "__main__":
    main()
