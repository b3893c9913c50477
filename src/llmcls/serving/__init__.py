"""Stage 7 — serving: ``classifier`` (a run or an export, loaded for scoring), ``batcher`` (dynamic batching,
framework-free), ``app`` (the FastAPI app, its limits and the uvicorn runner)."""
