"""Finding the resolved tickets that answer a question: ingest, hybrid index, search, tuning, evaluation.

The worker uses ``retrieval.search.TicketIndex``; the CLI commands live in ``retrieval.cli``.
"""
