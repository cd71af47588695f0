"""Training: recipes, freeze policy, checkpoints, data and synthetic documents."""

from fovea.data.records import DataError, Record, encode_record, load_dataset, read_records
from fovea.train.trainer import TrainConfig, TrainResult, configure_stage, train

__all__ = ["DataError", "Record", "TrainConfig", "TrainResult", "configure_stage", "encode_record", "load_dataset",
           "read_records", "train"]
