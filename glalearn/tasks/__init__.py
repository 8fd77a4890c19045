"""Synthetic tasks that probe what a token mixer can remember (chapter 10)."""

from glalearn.tasks.mqar import MQARBatch, mqar_accuracy, mqar_batch

__all__ = ["MQARBatch", "mqar_accuracy", "mqar_batch"]
