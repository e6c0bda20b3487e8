"""Building what nodes boot: the deploy ramdisk, and later OS images."""
