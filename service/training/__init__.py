"""Training over the API: datasets, jobs in worker processes, and their servicer."""
