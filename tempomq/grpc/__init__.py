"""The RocketMQ 5 gRPC protocol (``apache.rocketmq.v2.MessagingService``): the official RocketMQ
clients send and consume through tempomq unchanged. ``server`` starts it, ``service`` serves the
RPCs, ``convert`` translates messages, ``clients`` tracks Telemetry streams, ``auth`` is the hook
every call passes, ``protocol`` holds the generated modules."""
