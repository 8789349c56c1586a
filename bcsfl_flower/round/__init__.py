"""One BCS-FL round as a pipeline of small stages (see :mod:`bcsfl_flower.round.pipeline`)."""
