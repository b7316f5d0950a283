"""Who may do what: API keys, scopes, rate limits and the redaction of secrets in logs."""
