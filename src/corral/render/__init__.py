"""Generating every file a node needs to boot and install, from the inventory."""
