"""What the agent and the server both speak: stdlib-only modules that the server's
transports import from the agent (never the other way round)."""
