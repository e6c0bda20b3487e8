"""Fixtures of the integration tests: the deployment testbed (see deploybed.py)."""

from tests.integration.deploybed import testbed

__all__ = ["testbed"]
