"""Loss functions on tensors, one file per family (logits, features, relations)."""
