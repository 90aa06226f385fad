"""The web console: quality, conversations, escalations, tickets, training and models, for admins.

FastAPI with server-rendered Jinja2 templates and server-side SVG charts: nothing to build, no JavaScript
framework. Served by uvicorn (`supportbot web --port N`).
"""
