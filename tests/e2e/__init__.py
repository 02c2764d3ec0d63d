"""End-to-end scenarios: the agent as a subprocess against the lab's guests."""
