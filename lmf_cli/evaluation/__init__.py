"""Evaluation: the SR protocol (`protocol`) and where the time goes (`benchmark`)."""
