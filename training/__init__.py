"""Trainers: the steps of stage-1 and stage-2 training, shared by the scripts, benchmarks and the GPU campaign."""
