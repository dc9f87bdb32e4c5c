"""The engine every answer goes through: many answers at once on one decoder (scheduler.py),
each seen by its caller as a Job (job.py), images encoded beside it (vision_worker.py)."""

from owl2_edge.engine.job import PENDING, Job, Pieces
from owl2_edge.engine.scheduler import PREFILL_CHUNK, Engine

__all__ = ["Engine", "Job", "Pieces", "PENDING", "PREFILL_CHUNK"]
