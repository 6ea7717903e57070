"""Where the generated ``ml_service_pb2`` takes its descriptors from.

Every Lumen package (the hub, lumen-clip, lumen-face, lumen-ocr, us) ships its own generated
copy of the Lumen protocol, package ``home_native.v1``, and they all run in one process under
the hub. protoc's generated code adds its file to protobuf's default descriptor pool, which
accepts a second file defining the same symbols only when its name and bytes are identical;
the copies are at different proto versions and have different names
(``proto/ml_service.proto`` upstream, ``ml_service.proto`` here), so a plain second import
dies with ``TypeError: Couldn't build proto file into descriptor pool: duplicate symbol
'home_native.v1.ErrorCode'``. ``tools/gen_proto.py`` therefore rewrites the generated
``DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(...)`` into a call to
`load_file`, which picks one of two sources:

* **Reuse a registered copy.** If the default pool already holds a file defining
  ``home_native.v1`` and it carries everything our code writes (every message, field,
  enum value and method of ours with the same number and type, `FIELDS_LEFT_AT_DEFAULT`
  excepted), our generated module uses that file's descriptor. Our message classes then
  *are* the host's classes (protobuf keeps one class per descriptor), which the hub
  needs: its router builds ``Capability(tasks=<our IOTasks>)`` with its own class, and
  protobuf refuses a message of another class there ("Parameter to initialize message
  field must be dict or instance of same class"). The hub imports its proto before it
  loads any service, so under the hub this is the path taken.
* **Otherwise, a private pool.** Our file goes into a `DescriptorPool` of its own, so the
  default pool stays free for whichever copy is imported after us. That pool reads every
  other file it needs (``google/protobuf/empty.proto``, and for server reflection the
  health and reflection protos) from the default pool on demand, except files of our own
  package, which would clash with ours. Our standalone server takes this path; its
  reflection service is given the same pool (``ml_service_pb2.DESCRIPTOR.pool``).

A registered copy that lacks something we write is not reused (its classes would raise on
our fields); we log a WARNING naming the differences and fall back to the private pool, so
the import still succeeds.

Checked with protobuf 7.x on the upb backend (the one in every published wheel), in both
import orders and through a gRPC server built from the other copy. With the pure-Python
backend (``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``) the generated code also
registers every message class in the default pool's symbol table, so a private pool does
not keep the default pool free there: that backend still loads us alone or after another
copy, but not before one.
"""

from __future__ import annotations

import logging

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

log = logging.getLogger(__name__)

# Fields an older registered copy may lack. We only ever advertise their proto3 defaults
# ("" / false: we take encoded images only, so clients send images, not tensors), and a
# default is what leaving a field out means on the wire, so code of ours never sets them.
FIELDS_LEFT_AT_DEFAULT = frozenset(
    {
        "home_native.v1.IOTask.tensor_preprocess_id",
        "home_native.v1.IOTask.tensor_batching_supported",
    }
)

# What must match for a copy to be reused: symbol -> its wire-relevant shape.
Signatures = dict[str, tuple[object, ...]]


def load_file(serialized: bytes) -> FileDescriptor:
    """Our file's descriptor: a compatible registered copy, else our bytes in a private pool."""
    ours = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    registered = _registered_copy(ours)
    if registered is not None:
        problems = differences(ours, registered)
        if not problems:
            log.debug("using the registered %s for %s", registered.name, ours.package)
            return registered
        log.warning(
            "%s already holds %s, but not as lumen_vlm writes it (%s); lumen_vlm uses a private "
            "copy, whose messages a router built on %s cannot hold",
            registered.name,
            ours.package,
            "; ".join(problems),
            registered.name,
        )
    return descriptor_pool.DescriptorPool(descriptor_db=_DefaultPoolFallback(ours)).FindFileByName(ours.name)


def built_from_ours(file: FileDescriptor) -> bool:
    """True when `load_file` built ``file`` from our bytes, False when it reused another copy.

    The generated module's pure-Python-backend block stores offsets into our serialized
    file on the descriptors; on a reused file they would point into the wrong bytes.
    """
    return file.pool is not descriptor_pool.Default()


def _registered_copy(ours: descriptor_pb2.FileDescriptorProto) -> FileDescriptor | None:
    """The default pool's file that defines one of our top-level symbols, if there is one."""
    names = [*ours.message_type, *ours.enum_type, *ours.service]
    for item in names:
        try:
            return descriptor_pool.Default().FindFileContainingSymbol(f"{ours.package}.{item.name}")
        except KeyError:
            continue
    return None


def differences(ours: descriptor_pb2.FileDescriptorProto, registered: FileDescriptor) -> list[str]:
    """What of ours the registered file lacks or defines differently, one line each."""
    theirs_proto = descriptor_pb2.FileDescriptorProto()
    registered.CopyToProto(theirs_proto)
    theirs = _signatures(theirs_proto)
    problems = []
    for symbol, shape in _signatures(ours).items():
        if symbol in FIELDS_LEFT_AT_DEFAULT:
            continue
        if symbol not in theirs:
            problems.append(f"{symbol} missing")
        elif theirs[symbol] != shape:
            problems.append(f"{symbol} is {theirs[symbol]}, ours is {shape}")
    return problems


def _signatures(file: descriptor_pb2.FileDescriptorProto) -> Signatures:
    """Every message field, enum value and method of a file, by full name."""
    found: Signatures = {}
    prefix = file.package

    def add_message(message: descriptor_pb2.DescriptorProto, scope: str) -> None:
        name = f"{scope}.{message.name}"
        found[name] = ("message",)
        for field in message.field:
            found[f"{name}.{field.name}"] = (field.number, field.type, field.label, field.type_name)
        for nested in message.nested_type:  # map entries live here
            add_message(nested, name)

    for message in file.message_type:
        add_message(message, prefix)
    for enum in file.enum_type:
        found[f"{prefix}.{enum.name}"] = ("enum",)
        for value in enum.value:
            found[f"{prefix}.{enum.name}.{value.name}"] = (value.number,)
    for service in file.service:
        found[f"{prefix}.{service.name}"] = ("service",)
        for method in service.method:
            found[f"{prefix}.{service.name}.{method.name}"] = (
                method.input_type,
                method.output_type,
                method.client_streaming,
                method.server_streaming,
            )
    return found


class _DefaultPoolFallback:
    """The descriptor database behind the private pool: our file, then the default pool's files.

    Files of our own package are refused: loading another copy next to ours would clash.
    The method names are the ones a pool calls on its database; a lookup that fails raises
    KeyError, as a pool expects.
    """

    def __init__(self, ours: descriptor_pb2.FileDescriptorProto) -> None:
        self._ours = ours

    def FindFileByName(self, name: str) -> descriptor_pb2.FileDescriptorProto:
        if name == self._ours.name:
            return self._ours
        return self._from_default_pool(descriptor_pool.Default().FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> descriptor_pb2.FileDescriptorProto:
        return self._from_default_pool(descriptor_pool.Default().FindFileContainingSymbol(symbol))

    def _from_default_pool(self, file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
        if file.package == self._ours.package:
            raise KeyError(f"{file.name} is another copy of {file.package}")
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        return proto
