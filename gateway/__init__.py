"""KServe V2 (Open Inference Protocol) front door over HTTP and gRPC, in its own process."""
