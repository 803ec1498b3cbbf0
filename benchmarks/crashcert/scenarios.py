"""The scenarios: what each one saves or changes, from which template, with which operations.

An operation is a JSON list: ``["save", epoch, version, loss]``, ``["validate", epoch, version]``,
``["promote", version]`` or ``["rollback"]``. Operations are drawn from a seeded generator that
follows the model of the store (:mod:`.oracle`), so the parent can replay any prefix of them and
knows what the store must hold after each.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .oracle import CheckpointModel, RegistryModel, version_key

RETENTION = {"max_checkpoints": 3, "keep_best": True}
TEMPLATE_EPOCHS = 5
REGISTRY_EPOCHS = 4


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    """``checkpoints`` (saves under retention) or ``registry`` (validate, promote, rollback)."""
    remote: bool
    shape: str
    """The contents' shape (:mod:`.contents`)."""
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    """Further ``CheckpointManager`` options (async, incremental)."""
    resave_probability: float = 0.0
    """How often a save re-saves an epoch that is listed instead of saving the next one."""

    @property
    def manager_options(self) -> dict[str, Any]:
        if self.kind == "registry":
            return {"max_checkpoints": None, "save_rng": False}
        return {**RETENTION, "metric_for_best": "loss", "mode": "min", "save_rng": False, **self.options}

    def template_ops(self, seed: int) -> list[list[Any]]:
        """The operations that build the template every trial starts from."""
        rng = random.Random(f"{seed}/{self.name}/template")
        if self.kind == "registry":
            saves = [["save", epoch, epoch, round(1.0 / (epoch + 1), 6)] for epoch in range(REGISTRY_EPOCHS)]
            return [*saves, ["validate", 0, "1.0.0"], ["validate", 1, "1.0.1"], ["promote", "1.0.0"]]
        return [["save", epoch, epoch, _loss(rng)] for epoch in range(TEMPLATE_EPOCHS)]

    def template_model(self, seed: int) -> Any:
        """The model of the template: what it holds once :meth:`template_ops` ran."""
        model = self.empty_model()
        for op in self.template_ops(seed):
            if self.kind == "registry" and op[0] == "save":
                continue
            model.apply(op)
        return model

    def empty_model(self) -> Any:
        if self.kind == "registry":
            return RegistryModel()
        return CheckpointModel(RETENTION["max_checkpoints"], RETENTION["keep_best"])

    def operations(self, seed: int, label: str) -> Iterator[list[Any]]:
        """An endless, seeded sequence of operations after the template."""
        rng = random.Random(f"{seed}/{self.name}/{label}")
        model = self.template_model(seed)
        if self.kind == "registry":
            yield from _registry_operations(rng, model)
        else:
            yield from _save_operations(rng, model, self.resave_probability)

    def plan(self, seed: int, label: str, count: int) -> list[list[Any]]:
        """The first ``count`` operations of :meth:`operations`."""
        ops = self.operations(seed, label)
        return [next(ops) for _ in range(count)]


def _loss(rng: random.Random) -> float:
    return round(rng.uniform(0.01, 1.0), 6)


def _save_operations(rng: random.Random, model: CheckpointModel, resave_probability: float) -> Iterator[list[Any]]:
    version = max(v for v, _ in model.listed.values()) + 1
    while True:
        newest = model.newest()
        assert newest is not None
        if rng.random() < resave_probability:
            # Mostly the newest epoch again (a restarted epoch); sometimes an older listed one.
            epoch = newest if rng.random() < 0.7 else rng.choice(sorted(model.listed))
        else:
            epoch = newest + 1
        op = ["save", epoch, version, _loss(rng)]
        model.apply(op)
        version += 1
        yield op


def _registry_operations(rng: random.Random, model: RegistryModel) -> Iterator[list[Any]]:
    while True:
        draw = rng.random()
        if draw < 0.3:
            highest = max(model.versions, key=version_key)
            major, minor, patch = version_key(highest)
            op: list[Any] = ["validate", rng.randrange(REGISTRY_EPOCHS), f"{major}.{minor}.{patch + 1}"]
        elif draw < 0.75 or not model.stack:
            others = sorted(set(model.versions) - {model.production}, key=version_key)
            op = ["promote", rng.choice(others) if others else model.production]
        else:
            op = ["rollback"]
        model.apply(op)
        yield op


SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        Scenario("sync", "checkpoints", False, "large",
                 "synchronous saves of new epochs, max_checkpoints=3 and keep_best, a 4 MiB weight (direct I/O)"),
        Scenario("async", "checkpoints", False, "medium",
                 "asynchronous saves (acknowledged after wait()), max_checkpoints=3 and keep_best",
                 options={"async_save": True}),
        Scenario("incremental", "checkpoints", False, "frozen",
                 "incremental saves that hard-link an unchanged backbone, max_checkpoints=3 and keep_best",
                 options={"incremental": True}),
        Scenario("resave", "checkpoints", False, "small",
                 "re-saves of a listed epoch (mostly the newest) among new epochs, max_checkpoints=3 and keep_best",
                 resave_probability=0.75),
        Scenario("registry", "registry", False, "small",
                 "local ArtifactRegistry: validate, promote and rollback"),
        Scenario("s3-save", "checkpoints", True, "remote",
                 "saves and re-saves on S3 through a proxy that resets and stalls connections, max_checkpoints=3 and keep_best",
                 resave_probability=0.25),
        Scenario("s3-promote", "registry", True, "small",
                 "ArtifactRegistry on S3 through the faulty proxy: validate, promote and rollback"),
    )
}
LOCAL_SCENARIOS = [name for name, scenario in SCENARIOS.items() if not scenario.remote]
