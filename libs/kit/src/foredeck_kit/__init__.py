"""Foredeck shared service runtime."""
