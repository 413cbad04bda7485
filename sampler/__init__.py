"""Decoding schedule and iterative sampler, kept apart from the networks and the trainers."""
