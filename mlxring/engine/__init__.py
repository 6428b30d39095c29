"""The head's engine (continuous batching, pipelined micro-batches) and every stage's state."""
