"""Multi-agent jobs: templates as data, steps as ordinary requests, scheduling inside the group commit."""

#: The metadata key every step request carries (its job's id): a finished request without it is
#: no job's step, so the group commit need not look it up among the steps.
STEP_METADATA_KEY = "job"
