"""The private descriptor pool of the vendored RocketMQ protocol modules (see regenerate.py)."""

from __future__ import annotations

from google.protobuf import descriptor_pool, duration_pb2, timestamp_pb2

POOL = descriptor_pool.DescriptorPool()
for _dependency in (duration_pb2, timestamp_pb2):
    POOL.AddSerializedFile(_dependency.DESCRIPTOR.serialized_pb)
