"""The OpenAI-compatible HTTP API on the head node (FastAPI, served by uvicorn)."""
