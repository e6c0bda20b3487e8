"""Image deployment: deployments, install plans, transports and the manager in corral serve."""
