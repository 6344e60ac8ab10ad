"""Party-side code: data loading, partitioning, models and the training loop."""
