"""Persistence: the schema (changed only through ``migrations/``) and engine set-up."""
