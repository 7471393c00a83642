"""sysvm agent package."""
