"""Celery workers: the answer path, light jobs (ingest, index, export) and training."""
