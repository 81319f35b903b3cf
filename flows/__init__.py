"""Prefect flows: they put library calls in order and publish artifacts; no ML logic lives here."""
