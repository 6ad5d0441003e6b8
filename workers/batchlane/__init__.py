"""The providers' batch lane: batch-lane requests gathered into provider batches at the batch price
(:mod:`workers.batchlane.runner`) through each provider's batch API (:mod:`workers.batchlane.api`)."""
