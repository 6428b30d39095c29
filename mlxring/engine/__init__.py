"""Continuous batching on the head: requests, the scheduler, stage state, the engine loop."""
