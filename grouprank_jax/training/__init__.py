"""What the SFT and GRPO stages share: the train state, the run directory, the one training loop
and the jitted gradient-accumulation-and-update helper."""
