"""CIFAR-style (32 px) networks benchmarked in knowledge-distillation papers (CRD, torchdistill)."""
