"""Hyperfleet's well-known ports on one machine: the defaults of `hyperfleet up`, the node agent
and the Hypercore stand-in, in one place so that no two roles disagree."""

# Ray's GCS: not 6379, Redis's port.
RAY_GCS_PORT = 6385
API_PORT = 8000
EMULATOR_PORT = 8090
# The local stack's redis-server: not 6379, where a system Redis may listen.
REDIS_PORT = 6390
# Hypercore listens on 8000 (gRPC) and 8001 (HTTP); 8000 is the Hyperfleet API's port here.
HYPERCORE_STANDIN_GRPC_BIND_ADDR = "127.0.0.1:8100"
HYPERCORE_STANDIN_HTTP_BIND_ADDR = "127.0.0.1:8101"
