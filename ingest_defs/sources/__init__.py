"""Broker sources, one module each, all behind the protocol in `base`."""
