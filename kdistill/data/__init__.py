"""Datasets, transforms, paired views, mixup and loaders."""
