"""Integrations with model libraries whose models need more than generic capture."""
