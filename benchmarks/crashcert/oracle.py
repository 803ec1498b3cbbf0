"""What a run or a registry must hold after a sequence of operations, written from the documented
rules alone (``docs/guarantees.md``), not from the library's code.

Both models are plain data (JSON round trips them), so the parent computes them and a checker in
another process compares the store with them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckpointModel:
    """The checkpoints a directory lists: ``{epoch: (version, loss)}``.

    Retention after each save keeps the ``max_checkpoints`` most recent epochs, the best (lowest
    loss, the earlier epoch on ties) when ``keep_best``, the newest, and the epoch just saved.
    """

    max_checkpoints: int | None
    keep_best: bool
    listed: dict[int, tuple[int, float]] = field(default_factory=dict)

    def save(self, epoch: int, version: int, loss: float) -> None:
        self.listed[epoch] = (version, loss)
        if self.max_checkpoints is None:
            return
        epochs = sorted(self.listed)
        keep = set(epochs[-self.max_checkpoints:]) | {epochs[-1], epoch}
        if self.keep_best:
            keep.add(min(epochs, key=lambda e: (self.listed[e][1], e)))
        self.listed = {e: self.listed[e] for e in epochs if e in keep}

    def newest(self) -> int | None:
        return max(self.listed) if self.listed else None

    def best(self) -> int | None:
        return min(self.listed, key=lambda e: (self.listed[e][1], e)) if self.listed else None

    def apply(self, op: list[Any]) -> None:
        kind, epoch, version, loss = op
        assert kind == "save", op
        self.save(epoch, version, loss)

    def copy(self) -> CheckpointModel:
        return copy.deepcopy(self)

    def to_json(self) -> dict[str, Any]:
        return {"max_checkpoints": self.max_checkpoints, "keep_best": self.keep_best,
                "listed": {str(e): list(v) for e, v in self.listed.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointModel:
        return cls(data["max_checkpoints"], data["keep_best"], {int(e): (v[0], v[1]) for e, v in data["listed"].items()})


@dataclass
class RegistryModel:
    """Validated versions (``{version: source epoch}``), production and its rollback stack, and the
    history a registry must record, in order."""

    versions: dict[str, int] = field(default_factory=dict)
    production: str | None = None
    stack: list[str] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)

    def apply(self, op: list[Any]) -> None:
        kind = op[0]
        if kind == "validate":
            _, epoch, version = op
            self.versions[version] = epoch
            self.events.append(("validate", version))
        elif kind == "promote":
            version = op[1]
            if version == self.production:
                return  # promoting what is in production changes nothing and records nothing
            if self.production is not None:
                self.stack.append(self.production)
            self.production = version
            self.events.append(("promote", version))
        elif kind == "rollback":
            self.production = self.stack.pop()
            self.events.append(("rollback", self.production))
        else:
            raise ValueError(f"not a registry operation: {op}")

    def state(self) -> dict[str, Any]:
        """What a registry shows of this model: versions, production and its stack."""
        return {"versions": sorted(self.versions, key=version_key), "production": self.production, "stack": list(self.stack)}

    def copy(self) -> RegistryModel:
        return copy.deepcopy(self)

    def to_json(self) -> dict[str, Any]:
        return {"versions": self.versions, "production": self.production, "stack": self.stack,
                "events": [list(event) for event in self.events]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RegistryModel:
        return cls(dict(data["versions"]), data["production"], list(data["stack"]), [tuple(e) for e in data["events"]])


def replay(events: list[tuple[str, str]]) -> dict[str, Any]:
    """The state a history leads to, by replaying its events from an empty registry."""
    model = RegistryModel()
    for event, version in events:
        if event == "rollback":
            if not model.stack or model.stack[-1] != version:
                return {"error": f"rollback to {version} with the stack {model.stack}"}
            model.apply(["rollback"])
        elif event == "promote":
            model.apply(["promote", version])
        else:
            model.apply(["validate", -1, version])
    return model.state()


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))
