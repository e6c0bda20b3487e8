"""The cluster inventory: distros, profiles, groups and nodes."""
