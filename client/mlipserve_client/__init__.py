"""mlipserve_client: the thin client of mlipserve (grpcio, protobuf, numpy and ase only).

``RemoteCalculator`` is an ASE calculator backed by a server; ``MLIPClient`` sends many systems in
one call, and runs property workflows (relax, eos, elastic, phonons, diatomics) over many
structures. Names are imported lazily so that ``mlipserve_client.types`` and ``.convert`` can be
used without loading grpc (the server's model code relies on that).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "MLIPClient": "mlipserve_client.client",
    "RemoteCalculator": "mlipserve_client.calculator",
    "ServiceError": "mlipserve_client.errors",
    "ServiceInputError": "mlipserve_client.errors",
    "InvalidSystemError": "mlipserve_client.errors",
    "Dispersion": "mlipserve_client.types",
    "Electrostatics": "mlipserve_client.types",
    "ModelInfo": "mlipserve_client.types",
    "Property": "mlipserve_client.types",
    "Result": "mlipserve_client.types",
    "System": "mlipserve_client.types",
    **{name: "mlipserve_client.workflow_types" for name in (
        "DiatomicOptions", "EOSOptions", "ElasticOptions", "PhononOptions", "RelaxOptions", "StructureError")},
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from mlipserve_client.calculator import RemoteCalculator
    from mlipserve_client.client import MLIPClient
    from mlipserve_client.errors import InvalidSystemError, ServiceError, ServiceInputError
    from mlipserve_client.types import Dispersion, Electrostatics, ModelInfo, Property, Result, System
    from mlipserve_client.workflow_types import (
        DiatomicOptions,
        ElasticOptions,
        EOSOptions,
        PhononOptions,
        RelaxOptions,
        StructureError,
    )


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlipserve_client' has no attribute {name!r}")
