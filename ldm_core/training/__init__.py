"""The training-run skeleton both stages use: run folder, accelerator, checkpoints, optimisation, EMA, stopping."""
