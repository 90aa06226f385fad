"""Channel adapters (console, Slack, Telegram), anonymization, and the command line.

torch is imported only by the anonymizer's name model (``bot/privacy/encoder.py``), and not at all with
``SUPPORTBOT_PRIVACY_NAME_MODEL_ENABLED=false``.
"""
