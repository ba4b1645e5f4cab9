"""Interop clients and media for tests/test_interop*.py (see docs/interop.md)."""
