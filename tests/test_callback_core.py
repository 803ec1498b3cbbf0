"""The callback core: both callbacks take every manager option, ``manager=``, and refuse both at once."""

from __future__ import annotations

import inspect

from ckpt_plugin import CheckpointManager
from ckpt_plugin._callback_core import ManagerOptions


def manager_parameters() -> dict[str, inspect.Parameter]:
    parameters = dict(inspect.signature(CheckpointManager.__init__).parameters)
    del parameters["self"]
    return parameters


def test_the_options_are_the_managers_own() -> None:
    parameters = manager_parameters()
    assert ManagerOptions.names() == tuple(parameters)
    assert {name: getattr(ManagerOptions(), name) for name in parameters} == {
        name: parameter.default for name, parameter in parameters.items()
    }
