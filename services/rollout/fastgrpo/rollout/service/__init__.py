"""Layer 5, the service: gRPC servicer, weight stores, metrics, configuration and the command line.
The only layer that knows protobuf and gRPC."""
