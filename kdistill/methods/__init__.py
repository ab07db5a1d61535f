"""Training methods: an nn.Module whose forward(batch) returns named loss terms."""
