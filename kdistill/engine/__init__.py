"""The one training loop, evaluation and DDP plumbing."""
