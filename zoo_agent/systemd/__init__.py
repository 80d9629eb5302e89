"""Talking to systemd: sd_notify, unit rendering and installation."""
