"""Placeholder: this module's commands are being written (owned by a parallel work stream)."""


def register(app) -> None:
    """Add this module's commands to the Typer app."""
