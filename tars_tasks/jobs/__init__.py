"""Multi-agent jobs: templates as data, steps as ordinary requests, scheduling inside the group commit."""
