"""mlxring: one large language model across a ring of machines over mlx.distributed."""

__version__ = "0.1.0"  # pyproject.toml's; `mlxring --version` prefers the installed metadata
