"""corral serve: the boot server (HTTP, TFTP, DHCP) that nodes boot and install from."""
