"""kdistill: knowledge distillation from a large image classifier to a small, fast one."""

__version__ = "0.1.0"
