"""Shared pieces every part of supportbot uses: settings, the SQL schema, domain types, errors."""
