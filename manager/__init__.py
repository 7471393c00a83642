"""sysvm manager package."""
