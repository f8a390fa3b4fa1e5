"""The HTTP API of Blaze Jobs (FastAPI). ``create_app`` builds it."""
