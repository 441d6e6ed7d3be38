"""A test client for crib's streaming server, written from the protocol
specifications (SPDY/3.1, RFC 6455, Kubernetes' channel protocols) without
importing any of the server's framing code, so tests prove interoperability
rather than agreement with itself."""
