"""Shard-building tools: the synthetic corpus, the LRS3/LRS2 converter and the shard validator."""
