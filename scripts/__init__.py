"""Stand-alone helper scripts (run as `python scripts/<name>.py`, or imported by tests and the server)."""
