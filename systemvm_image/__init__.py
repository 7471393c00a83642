"""sysvm systemvm_image package."""
