"""Iterative decoding (batched, and the lab's loop as its oracle) and its pictures, kept apart from the networks and
the trainers; the mask schedule it follows is the model's (models.schedules)."""
