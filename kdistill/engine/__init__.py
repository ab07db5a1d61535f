"""The one training loop, evaluation and run-folder logging (DDP helpers: kdistill.distributed)."""
