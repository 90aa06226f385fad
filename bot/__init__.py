"""Channel adapters (console, later Slack and Telegram), anonymization, and the command line. Never imports torch."""
