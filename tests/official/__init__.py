"""Official-layout checkpoints made by the authors' code (outside this repository) with random
weights, and that code's outputs: test data for LM-CiaoSR, CiaoSR and the SwinIR encoder."""
