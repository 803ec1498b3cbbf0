"""The checker: a process forked from the zygote after each trial that opens the store as the next
run would, and checks every invariant of ``docs/guarantees.md`` the kill could have broken.

It sends back ``{"violations": [...], "facts": {...}}``. The models it compares with
(:mod:`.oracle`) come from the parent: ``before`` (every acknowledged operation applied) and, when
one operation's outcome is unknown (it was interrupted, or it failed), ``after`` (that one too).
"""

from __future__ import annotations

import os
import re
import traceback
import warnings
from pathlib import Path
from typing import Any

from .contents import model_state, optimizer_state
from .oracle import CheckpointModel, RegistryModel, replay
from .scenarios import SCENARIOS, Scenario

CHECKPOINT_NAME = re.compile(r"epoch_(0|[1-9][0-9]*)")
KEPT_HIDDEN = {".listing.json", ".saves.jsonl"}
"""Hidden files a run keeps for good: the listing cache and the save log."""
SAVE_LOG_PREFIX = ".saves"


def run(spec: dict[str, Any], conn: Any) -> None:
    output = os.open(spec["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.chdir(spec["cwd"])
    import torch

    torch.set_num_threads(1)
    report: dict[str, Any] = {"violations": [], "facts": {}}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Checker(spec, report).check()
        for warning in caught:  # what the library warns about when it opens, lists or loads
            if issubclass(warning.category, UserWarning) and "site-packages" not in warning.filename:
                report["violations"].append(f"opening the store warned: {warning.message}")
    except Exception:  # noqa: BLE001 - a check that crashes is a finding too
        report["violations"].append(f"the check raised: {traceback.format_exc(limit=6)}")
    conn.send(report)


class Checker:
    def __init__(self, spec: dict[str, Any], report: dict[str, Any]) -> None:
        self.spec = spec
        self.scenario: Scenario = SCENARIOS[spec["scenario"]]
        self.location: str = spec["location"]
        self.options = {"storage_options": {"endpoint_url": spec["endpoint"]}} if self.scenario.remote else {}
        self.violations: list[str] = report["violations"]
        self.facts: dict[str, Any] = report["facts"]

    def check(self) -> None:
        from ckpt_plugin._storage import trash

        if self.scenario.kind == "registry":
            self.check_registry()
        else:
            self.check_checkpoints()
        trash.drain()
        if self.scenario.remote:
            self.check_uploads()

    # ------------------------------------------------------------------ checkpoints

    def check_checkpoints(self) -> None:
        from ckpt_plugin import CheckpointManager
        from ckpt_plugin.errors import CheckpointError
        from ckpt_plugin._storage import trash

        manager = CheckpointManager(self.location, **self.scenario.manager_options, **self.options)
        trash.drain()
        listed = manager.checkpoints()
        actual: dict[int, int] = {}
        for info in listed:
            if info.name != f"epoch_{info.epoch}":
                self.violations.append(f"{info.name} is listed with epoch {info.epoch} step {info.step}")
            try:
                checkpoint = manager.load(info.epoch)
            except CheckpointError as exc:
                self.violations.append(f"listed {info.name} cannot be loaded: {exc}")
                continue
            version = checkpoint["extra"]["version"]
            actual[info.epoch] = version
            self.check_saved_content(info.name, info.epoch, version, checkpoint)
        self.facts["listed"] = {str(epoch): version for epoch, version in sorted(actual.items())}
        self.violations.extend(judge_listing(actual, self.spec))
        if self.scenario.remote:
            self.check_remote_prefixes(listed)
        else:
            self.check_local_run(Path(self.location), listed)
            entries = sorted(os.listdir(Path(self.location).parent))
            if entries != ["checkpoints"]:
                self.violations.append(f"leftovers beside the run after the next open: {entries}")

    def check_saved_content(self, name: str, epoch: int, version: int, checkpoint: dict[str, Any]) -> None:
        written = self.spec["written"].get(str(epoch), [])
        if version not in written:
            self.violations.append(f"{name} holds version {version}, which was never saved to epoch {epoch} (saved: {written})")
            return
        shape = self.scenario.shape
        problem = differs(model_state(shape, version), checkpoint["model"], "model") or differs(
            optimizer_state(shape, version), checkpoint["optimizer"], "optimizer"
        )
        if problem:
            self.violations.append(f"{name} (version {version}) is not bit-exact: {problem}")
        loss = self.spec["losses"][str(version)]
        if checkpoint["metrics"] != {"loss": loss}:
            self.violations.append(f"{name} (version {version}) records metrics {checkpoint['metrics']}, not loss {loss}")

    def check_local_run(self, root: Path, listed: list[Any]) -> None:
        """After the next open: nothing hidden but the listing cache and the save log, nothing that
        is not a checkpoint, and no file in a checkpoint that its metadata does not name."""
        for name in sorted(os.listdir(root)):
            if name.startswith("."):
                if name not in KEPT_HIDDEN:
                    self.violations.append(f"leftover {root.name}/{name} after the next open")
            elif not CHECKPOINT_NAME.fullmatch(name):
                self.violations.append(f"unexpected entry {root.name}/{name} after the next open")
        for info in listed:
            extra = set(os.listdir(info.location)) - set(info.files) - {"metadata.json"}
            if extra:
                self.violations.append(f"{info.name} holds files its metadata does not name: {sorted(extra)}")

    def check_remote_prefixes(self, listed: list[Any]) -> None:
        """After the next open, one committed prefix per checkpoint; once the grace period has
        passed, recovery leaves no uncommitted prefix either."""
        from ckpt_plugin._storage.fsspec import ManifestStore

        visible = {info.location.rstrip("/").rsplit("/", 1)[-1] for info in listed}
        committed, uncommitted, other = self.remote_tops(self.location)
        superseded = sorted(committed - visible)
        if superseded:
            self.violations.append(f"committed prefixes that no listing shows remain after the next open: {superseded}")
        self.facts["uncommitted_prefixes"] = len(uncommitted)
        ManifestStore(self.location, self.options["storage_options"], grace_seconds=0).recover()
        _, uncommitted, other = self.remote_tops(self.location)
        if uncommitted:
            self.violations.append(f"uncommitted prefixes remain after recovery past the grace period: {sorted(uncommitted)}")
        if other - {SAVE_LOG_PREFIX}:
            self.violations.append(f"unexpected objects in the run: {sorted(other - {SAVE_LOG_PREFIX})}")

    def remote_tops(self, location: str) -> tuple[set[str], set[str], set[str]]:
        """The top-level names under ``location``: committed prefixes, uncommitted ones, and the rest."""
        from ckpt_plugin._storage.fsspec import FsspecBackend

        objects = FsspecBackend(location, self.options["storage_options"]).walk(location)
        tops = {relative.partition("/")[0] for relative in objects}
        prefixes = {top for top in tops if "@" in top and f"{top}/metadata.json" in objects}
        uncommitted = {top for top in tops if "@" in top} - prefixes
        return prefixes, uncommitted, tops - prefixes - uncommitted

    # ------------------------------------------------------------------ registry

    def check_registry(self) -> None:
        from ckpt_plugin import ArtifactRegistry

        registry = ArtifactRegistry(self.location, **self.options)
        observed, history = self.registry_state(registry)
        self.facts["production"] = observed["production"]
        before = RegistryModel.from_json(self.spec["before"])
        after = RegistryModel.from_json(self.spec["after"]) if self.spec.get("after") else None
        matched = next((m for m in (before, after) if m is not None and m.state() == observed), None)
        if matched is None:
            self.violations.append(
                f"the registry shows {observed}, neither the state before the interrupted operation {before.state()}"
                + (f" nor after it {after.state()}" if after is not None else "")
            )
        elif history != matched.events:
            self.violations.append(f"the history {history} is not the one of the registry's state ({matched.events})")
        replayed = replay(history)
        if replayed != observed:
            self.violations.append(f"the history leads to {replayed}, but the registry shows {observed}")
        self.facts["changed"] = matched is after and after is not None
        known = {**before.versions, **(after.versions if after is not None else {})}
        self.check_registry_contents(registry, observed, known)

        if self.scenario.remote:
            registry._places.grace_seconds = 0  # the grace period has passed: every leftover is a dead writer's
        registry.promote(observed["production"])  # the next change: it settles what the kill left
        settled, settled_history = self.registry_state(registry)
        if (settled, settled_history) != (observed, history):
            self.violations.append(f"settling changed the registry from {observed} {history} to {settled} {settled_history}")
        if self.scenario.remote:
            self.check_remote_registry(registry)
        else:
            self.check_local_registry(registry)

    @staticmethod
    def registry_state(registry: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        production = registry.production()
        observed = {
            "versions": registry.versions(),
            "production": None if production is None else production["version"],
            "stack": [] if production is None else list(production["previous_versions"]),
        }
        return observed, [(event["event"], event["version"]) for event in registry.history()]

    def check_registry_contents(self, registry: Any, observed: dict[str, Any], known: dict[str, int]) -> None:
        """Every validated version and production load, bit-exact to the checkpoint they came from."""
        from ckpt_plugin.errors import CheckpointError

        shape = self.scenario.shape
        for version in observed["versions"]:
            epoch = known.get(version)
            if epoch is None:
                self.violations.append(f"version {version} is validated but was never validated by the run")
                continue
            try:
                loaded = registry.load(version)
            except CheckpointError as exc:
                self.violations.append(f"validated version {version} cannot be loaded: {exc}")
                continue
            problem = differs(model_state(shape, epoch), loaded["model"], "model") or differs(
                optimizer_state(shape, epoch), loaded["optimizer"], "optimizer")
            if problem:
                self.violations.append(f"validated version {version} is not bit-exact to epoch {epoch}: {problem}")
        try:
            served = registry.load_production()
        except CheckpointError as exc:
            self.violations.append(f"production cannot be loaded: {exc}")
            return
        if served is None or served["version"] != observed["production"]:
            self.violations.append(f"load_production() served {served and served['version']}, production() says {observed['production']}")
            return
        epoch = known.get(served["version"])
        expected = {key: tensor for key, tensor in model_state(shape, epoch).items()} if epoch is not None else None
        problem = differs(expected, served["model"], "production") if expected is not None else "unknown version"
        if problem:
            self.violations.append(f"production {served['version']} is not bit-exact to epoch {epoch}: {problem}")

    def check_local_registry(self, registry: Any) -> None:
        root = Path(self.location).parent
        entries = sorted(os.listdir(root))
        if entries != ["checkpoints", "production", "validated"]:
            self.violations.append(f"leftovers beside the run after the next change: {entries}")
        self.check_local_run(Path(self.location), registry.manager.checkpoints())
        validated = Path(registry.validated_dir)
        expected = {f"v{version}" for version in registry.versions()} | {"history.jsonl", ".registry.lock"}
        extra = sorted(set(os.listdir(validated)) - expected)
        if extra:
            self.violations.append(f"leftovers in validated/ after the next change: {extra}")
        for version in registry.versions():
            directory = Path(registry.version_dir(version))
            named = set(registry.validation(version)["files"]) | {"validation.json"}
            unnamed = sorted(set(os.listdir(directory)) - named)
            if unnamed:
                self.violations.append(f"validated {version} holds files its record does not name: {unnamed}")
        production = sorted(os.listdir(registry.production_dir))
        if production != ["model.json", "model.safetensors"]:
            self.violations.append(f"production/ holds {production} after the next change")

    def check_remote_registry(self, registry: Any) -> None:
        """Once the grace period has passed, the next change leaves the claimed versions, the
        history, the pointer and the weights it points at, and nothing else."""
        from ckpt_plugin._storage.fsspec import FsspecBackend

        pointed = registry.production().get("weights", "model.safetensors")
        registry._places.recover(pointed)
        backend = FsspecBackend(str(registry.validated_dir), self.options["storage_options"])
        validated = {relative.partition("/")[0] for relative in backend.walk(str(registry.validated_dir))}
        claimed = {str(registry.version_dir(version)).rsplit("/", 1)[-1] for version in registry.versions()}
        expected = claimed | {f"v{version}.json" for version in registry.versions()} | {"history"}
        extra = sorted(validated - expected)
        if extra:
            self.violations.append(f"leftovers in validated/ after the next change past the grace period: {extra}")
        production = {relative.partition("/")[0] for relative in backend.walk(str(registry.production_dir))}
        if production != {"model.json", pointed}:
            self.violations.append(f"production/ holds {sorted(production)} after the next change, not model.json and {pointed}")

    # ------------------------------------------------------------------ multipart uploads

    def check_uploads(self) -> None:
        """No multipart upload is left open, but those the kill cut off: an upload the worker learned
        the id of and never ended, or one whose creation was under way when it died."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.spec["endpoint"])
        bucket, prefix = self.spec["bucket"], self.spec["prefix"]
        open_uploads = []
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            open_uploads.extend((upload["Key"], upload["UploadId"]) for upload in page.get("Uploads", []))
        started, opened, ended = read_upload_log(self.spec["uploads"])
        # Keys whose upload was under way when the worker died: created (or being created) and not
        # completed or aborted. An upload there that the worker never learned the id of comes from
        # a creation sent again; the writer aborts those when its file is done, which it never was.
        in_progress = {key for key, count in started.items() if count > sum(1 for i, k in opened.items() if k == key and i in ended)}
        killed = self.spec["killed"]
        excused = 0
        for key, upload_id in open_uploads:
            if upload_id in ended:
                self.violations.append(f"multipart upload {upload_id} of {key} was completed or aborted but is open")
            elif killed and key in in_progress:
                excused += 1
            elif upload_id in opened:
                self.violations.append(f"multipart upload of {key} was started and never completed or aborted")
            else:
                self.violations.append(
                    f"multipart upload {upload_id} of {key} is open and the worker never received its id "
                    "(a create_multipart_upload sent again after its response was lost), although its file was done"
                )
        self.facts["uploads_cut_off_by_the_kill"] = excused


def read_upload_log(path: str) -> tuple[dict[str, int], dict[str, str], set[str]]:
    """``(starts per key, {upload id: key} learned, upload ids ended)`` from a worker's upload log."""
    started: dict[str, int] = {}
    opened: dict[str, str] = {}
    ended: set[str] = set()
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        parts = line.split(" ")
        if parts[0] == "upload-start" and len(parts) == 2:
            started[parts[1]] = started.get(parts[1], 0) + 1
        elif parts[0] == "upload-open" and len(parts) == 3:
            opened[parts[2]] = parts[1]
        elif parts[0] == "upload-end" and len(parts) == 3:
            ended.add(parts[2])
    return started, opened, ended


def judge_listing(actual: dict[int, int], spec: dict[str, Any]) -> list[str]:
    """Compare the checkpoints listed (``{epoch: version}``) with what retention must have left.

    Without the interrupted save committed, exactly the ``before`` model. With it committed (its
    epoch holds its version), at least what the ``after`` model keeps and at most ``before`` plus
    the new save: its retention may have been cut off part-way.
    """
    before = CheckpointModel.from_json(spec["before"])
    after = CheckpointModel.from_json(spec["after"]) if spec.get("after") else None
    interrupted = spec.get("interrupted")
    pairs = set(actual.items())
    lower = {(epoch, version) for epoch, (version, _) in before.listed.items()}
    upper = set(lower)
    committed = bool(interrupted) and interrupted[0] == "save" and actual.get(interrupted[1]) == interrupted[2]
    if committed:
        assert after is not None
        lower = {(epoch, version) for epoch, (version, _) in after.listed.items()}
        upper = {pair for pair in upper if pair[0] != interrupted[1]} | {(interrupted[1], interrupted[2])}
    reference = after if committed else before
    acknowledged = set(spec["acknowledged"])
    problems = []
    for epoch, version in sorted(lower - pairs):
        roles = [role for role, match in (("newest", epoch == reference.newest()), ("best", epoch == reference.best()),
                                          ("acknowledged", version in acknowledged)) if match]
        held = f"holds version {actual[epoch]}" if epoch in actual else "is missing"
        problems.append(f"{' and '.join(roles) or 'kept'} checkpoint epoch_{epoch} (version {version}) {held} after the kill")
    for epoch, version in sorted(pairs - upper - {(e, actual[e]) for e, _ in lower - pairs if e in actual}):
        problems.append(f"epoch_{epoch} (version {version}) is listed, but retention had deleted it or never kept it")
    return problems


def differs(expected: Any, actual: Any, label: str) -> str | None:
    """Where ``actual`` differs from ``expected`` (types, keys, shapes, dtypes, bits), or None."""
    from core_helpers import assert_same_tree

    try:
        assert_same_tree(expected, actual, label)
    except AssertionError as exc:
        return str(exc)
    return None
