"""Task registry: task names -> handlers, and the capability a service reports from them.

A service registers each task it offers with the handler that answers it and the MIME types
it accepts and produces. `InferRequest.task` is routed through `TaskRegistry.get`, and
`TaskRegistry.capability` turns the same records into the `Capability` message, so a task
cannot be served without being advertised, or advertised without being served.

The registry knows neither the model nor the transport: handlers are opaque callables and the
facts that go into a capability (model ids, runtime, limits) are passed in by the service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .proto import ml_service_pb2
from .text import shown

PROTOCOL_VERSION = "1.0.0"

# A handler answers one complete request with one or more responses, the last one final.
TaskHandler = Callable[..., Iterator[ml_service_pb2.InferResponse]]


class UnknownTaskError(LookupError):
    """A request names a task this service does not offer."""

    def __init__(self, task: str, available: Iterable[str]) -> None:
        self.task = task
        self.available = tuple(available)
        named = shown(task) if task else "(empty)"
        super().__init__(f"unknown task {named}; available tasks: {', '.join(self.available)}")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, the handler that answers it, and what it reads and writes."""

    name: str
    handler: TaskHandler
    input_mimes: tuple[str, ...]
    output_mimes: tuple[str, ...]


class TaskRegistry:
    """Task name -> TaskSpec, in registration order."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}

    def register(self, spec: TaskSpec) -> None:
        if not spec.name:
            raise ValueError("a task needs a name")
        if spec.name in self._tasks:
            raise ValueError(f"task {spec.name!r} is already registered")
        self._tasks[spec.name] = spec

    def get(self, name: str) -> TaskSpec:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTaskError(name, self._tasks) from None

    def names(self) -> list[str]:
        return list(self._tasks)

    def io_tasks(self, limits: Mapping[str, Any]) -> list[ml_service_pb2.IOTask]:
        """One IOTask per task; every task shares the service's enforced limits."""
        as_strings = {key: str(value) for key, value in limits.items()}
        # tensor_preprocess_id and tensor_batching_supported stay unset: we take encoded images
        # only, so we advertise their defaults ("" / false), and the hub's older copy of the
        # proto, whose classes we may be using, has no such fields (proto/_pool.py).
        return [
            ml_service_pb2.IOTask(
                name=spec.name,
                input_mimes=list(spec.input_mimes),
                output_mimes=list(spec.output_mimes),
                limits=as_strings,
            )
            for spec in self._tasks.values()
        ]

    def capability(
        self,
        *,
        service_name: str,
        model_ids: Iterable[str],
        runtime: str,
        max_concurrency: int,
        precisions: Iterable[str],
        extra: Mapping[str, Any],
        limits: Mapping[str, Any],
    ) -> ml_service_pb2.Capability:
        """The Capability message for the registered tasks and the facts the service passes in."""
        return ml_service_pb2.Capability(
            service_name=service_name,
            model_ids=list(model_ids),
            runtime=runtime,
            max_concurrency=max_concurrency,
            precisions=list(precisions),
            extra={key: str(value) for key, value in extra.items()},
            tasks=self.io_tasks(limits),
            protocol_version=PROTOCOL_VERSION,
        )
