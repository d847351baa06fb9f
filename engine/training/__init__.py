"""What every training stage shares: torchrun as values, the optimiser, logging, resume, shared flags,
the roofline."""
