"""Limits of request values that the engine, the API schemas and the command line all
check (kept free of mlx, so that `--help` and the CLI's checks stay light)."""

SEED_LIMIT = 2**64  # seeds are unsigned 64-bit (mx.random.key's range)
