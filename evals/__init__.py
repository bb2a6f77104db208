"""Eval runner (POPE, CHAIR, lm-eval); see the eval issue."""
