"""crib: the daemon (CLI, config, gRPC server, error boundary, logging, tracing)."""

__version__ = "0.1.0"
