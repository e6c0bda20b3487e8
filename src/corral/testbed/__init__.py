"""Test harness: boot real qemu VMs over PXE in network namespaces against corral's services."""
