"""Thin kopf handlers: observe, call the pure core, apply, report status."""
