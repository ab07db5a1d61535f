"""Data in three stages, each calling only the one below: ``sources`` (which files),
``datasets`` (how an item is made; with ``views`` and ``softlabels``), ``loader`` (how
batches are formed). ``transforms`` holds the pixel operations the items use."""
