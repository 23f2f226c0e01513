"""`make bench`: the batch path's speed against the bare client, measured in the same run."""
