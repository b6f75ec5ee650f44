"""Foredeck's local stack: store processes, service discovery and `foredeck up`."""
