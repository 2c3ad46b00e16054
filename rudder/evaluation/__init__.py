"""Playing agents over the environments and scoring them: episodes (in step or in the background), per-trace
scores beside the oracles, reports and plots. It imports the environments and the agents, never the reverse."""
