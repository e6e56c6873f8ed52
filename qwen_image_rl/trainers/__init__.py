"""Trainers, one module per `config.trainer`; importing this package registers them all."""
