"""What runs inside a sub-agent: provider clients, retries, the group-commit writer."""
