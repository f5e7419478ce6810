"""Property workflows served in batches: relax, equation of state, elastic constants, phonons and
diatomic curves over many structures, every evaluation a request on the model's batch queue.

Transport-agnostic: no grpc, no ray. The server binds a model into an ``Evaluate`` and iterates
``run_workflow(options, structures, evaluate)``; the options' type picks the workflow, and options,
results and events are the thin client's types (mlipserve_client.workflow_types).
"""

from mlipserve.workflows.runner import WORKFLOWS, run_workflow
from mlipserve.workflows.session import Evaluate
from mlipserve_client.workflow_types import diatomic_systems

__all__ = ["WORKFLOWS", "Evaluate", "diatomic_systems", "run_workflow"]
