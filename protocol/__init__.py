"""sysvm protocol package."""
